//! Harness for the integration tests: the process handles of [`testnet`]
//! (real `node` processes on loopback, killed on drop) and the exact sums
//! computed from the inputs alone, independently of the nodes, and a local
//! Anvil chain (stopped on drop) with the ledger contract.

pub use testnet::chain::{Anvil, contracts_dir, deploy, ensure_tools, ledger_json, node_command};
pub use testnet::process::{Node, Round, TempDir, apt_install, ensure_fashion_mnist, event_time, run_node, wait_until};
pub use testnet::verify::{check_records, commit_root, expected_sum_hash};
