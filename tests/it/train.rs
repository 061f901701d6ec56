use serde_json::Value;
use tests::{ensure_fashion_mnist, run_node};

fn events<'a>(log: &'a [Value], message: &str) -> Vec<&'a Value> {
    log.iter().filter(|e| e["message"] == message).collect()
}

/// The same parameters and the same micro-batches give bit-identical
/// gradients and parameters in two separate processes (the CPU backend is
/// bit-exact, which gradient audits rely on).
#[test]
fn gradients_are_bit_identical_across_processes() {
    let data = ensure_fashion_mnist().to_str().unwrap().to_owned();
    let args = [
        "train",
        "--dataset",
        &data,
        "--model",
        "mlp",
        "--train-limit",
        "2048",
        "--test-limit",
        "200",
        "--max-steps",
        "4",
        "--log-every",
        "1",
        "--seed",
        "5",
    ];
    let (a_code, a) = run_node(&args);
    let (b_code, b) = run_node(&args);
    assert_eq!((a_code, b_code), (Some(0), Some(0)));
    let steps = |log: &[Value]| -> Vec<(String, String)> {
        events(log, "step")
            .iter()
            .map(|e| (e["grad_hash"].as_str().unwrap().to_owned(), e["param_hash"].as_str().unwrap().to_owned()))
            .collect()
    };
    let (sa, sb) = (steps(&a), steps(&b));
    assert_eq!(sa.len(), 4);
    assert_eq!(sa, sb, "two processes computed other gradients or parameters");
    // And the steps really differ from one another (the hashes are not constant).
    assert_ne!(sa[0].0, sa[1].0);
}

/// A few hundred steps on real Fashion-MNIST: the loss falls and test accuracy
/// is far above chance (10%).
#[test]
fn a_short_run_on_fashion_mnist_learns() {
    let data = ensure_fashion_mnist().to_str().unwrap().to_owned();
    let (code, log) = run_node(&[
        "train",
        "--dataset",
        &data,
        "--model",
        "mlp",
        "--train-limit",
        "19200",
        "--test-limit",
        "2000",
        "--batch",
        "64",
        "--epochs",
        "1",
        "--log-every",
        "25",
    ]);
    assert_eq!(code, Some(0), "{log:?}");
    let losses: Vec<f64> = events(&log, "step").iter().map(|e| e["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 12, "300 steps logged every 25");
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(last < first * 0.7, "the loss fell: {losses:?}");
    let eval = events(&log, "evaluated");
    let acc = eval.last().unwrap()["accuracy"].as_f64().unwrap();
    assert!(acc > 0.70, "test accuracy {acc}");
}
