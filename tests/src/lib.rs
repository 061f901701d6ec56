//! Harness for the integration tests: the process handles of [`testnet`]
//! (real `node` processes on loopback, killed on drop) and the exact sums
//! computed from the inputs alone, independently of the nodes.

pub use testnet::process::{Node, Round, TempDir, ensure_fashion_mnist, run_node, wait_until};
pub use testnet::verify::expected_sum_hash;
