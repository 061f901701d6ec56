//! The Solidity suite (forge, offline, pinned compiler) passes, the sources are
//! formatted, and the committed artifact the node binds to is what the current
//! sources compile to.

use std::process::Command;
use tests::{contracts_dir, ensure_tools};

fn forge(args: &[&str]) -> std::process::Output {
    let tools = ensure_tools();
    Command::new(&tools.forge).args(args).current_dir(contracts_dir()).output().expect("run forge")
}

#[test]
fn contract_tests_pass_and_the_committed_artifact_is_current() {
    let fmt = forge(&["fmt", "--check"]);
    assert!(
        fmt.status.success(),
        "contracts are not formatted (run `forge fmt` in contracts/):\n{}",
        String::from_utf8_lossy(&fmt.stdout)
    );

    let test = forge(&["test", "--offline"]);
    let out = String::from_utf8_lossy(&test.stdout);
    assert!(test.status.success(), "forge test failed:\n{out}\n{}", String::from_utf8_lossy(&test.stderr));
    // Every revert path and the fuzzers ran: a suite that silently shrank would pass too.
    let passed = out.lines().filter(|l| l.starts_with("[PASS]")).count();
    assert!(passed >= 36, "only {passed} contract tests ran:\n{out}");
    assert!(out.contains("testFuzz_recordContribution") && out.contains("runs: 512"), "{out}");

    let build = forge(&["build", "--offline"]);
    assert!(build.status.success(), "forge build failed: {}", String::from_utf8_lossy(&build.stderr));
    let dir = contracts_dir();
    let fresh: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/TrainingLedger.sol/TrainingLedger.json")).unwrap())
            .unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("artifacts/TrainingLedger.json")).unwrap()).unwrap();
    let stale = "contracts/artifacts/TrainingLedger.json is stale: run contracts/tools/update-artifact and commit it";
    assert_eq!(committed["abi"], fresh["abi"], "{stale}");
    assert_eq!(committed["bytecode"], fresh["bytecode"]["object"], "{stale}");
    assert_eq!(committed["deployedBytecode"], fresh["deployedBytecode"]["object"], "{stale}");
    assert_eq!(committed["compiler"], fresh["metadata"]["compiler"]["version"], "{stale}");
}
