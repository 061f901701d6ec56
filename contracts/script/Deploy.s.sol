// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.30;

import {TrainingLedger} from "../src/TrainingLedger.sol";

interface VmScript {
    function startBroadcast() external;
    function stopBroadcast() external;
}

/// @notice Deploys the ledger with forge, for those who prefer it to `node deploy`:
///         `forge script script/Deploy.s.sol --rpc-url <url> --private-key <key> --broadcast`.
contract Deploy {
    VmScript internal constant vm = VmScript(address(uint160(uint256(keccak256("hevm cheat code")))));

    function run() external returns (TrainingLedger ledger) {
        vm.startBroadcast();
        ledger = new TrainingLedger();
        vm.stopBroadcast();
    }
}
