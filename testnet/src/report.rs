//! The report a testnet run leaves behind: its configuration, peers, rounds,
//! accuracy and loss curves, throughput, faults and on-chain records, as JSON
//! (for tools), Markdown, and HTML with the curves drawn (for people).

use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Writes `report` as `<dir>/<name>.json`, `.md` and `.html`; returns their paths.
pub fn write(dir: &Path, name: &str, report: &Value) -> anyhow::Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir)?;
    let path = |ext: &str| dir.join(format!("{name}.{ext}"));
    std::fs::write(path("json"), serde_json::to_vec_pretty(report)?)?;
    std::fs::write(path("md"), markdown(report))?;
    std::fs::write(path("html"), html(report))?;
    Ok([path("json"), path("md"), path("html")])
}

/// An SVG line chart of `points` (x, y), `w` by `h` pixels.
fn svg_chart(points: &[(f64, f64)], w: f64, h: f64, label: &str) -> String {
    if points.len() < 2 {
        return format!("<p>{label}: fewer than two points</p>");
    }
    let (x0, x1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = 40.0;
    let sx = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-9) * (w - pad - 10.0);
    let sy = |y: f64| h - 20.0 - (y - y0) / (y1 - y0).max(1e-9) * (h - 30.0);
    let line: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
    format!(
        "<figure><figcaption>{label}</figcaption><svg width=\"{w}\" height=\"{h}\">\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#999\"/>\
         <line x1=\"{pad}\" y1=\"10\" x2=\"{pad}\" y2=\"{b}\" stroke=\"#999\"/>\
         <text x=\"2\" y=\"14\" font-size=\"11\">{y1:.3}</text><text x=\"2\" y=\"{b}\" font-size=\"11\">{y0:.3}</text>\
         <text x=\"{pad}\" y=\"{h}\" font-size=\"11\">round {x0}</text>\
         <text x=\"{xr}\" y=\"{h}\" font-size=\"11\">round {x1}</text>\
         <polyline fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"1.5\" points=\"{}\"/></svg></figure>",
        line.join(" "),
        b = h - 20.0,
        r = w - 10.0,
        xr = w - 80.0,
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The report as one self-contained HTML page: the curves drawn, then the Markdown's sections
/// as preformatted text.
pub fn html(r: &Value) -> String {
    let curve = |key: &str, scale: f64| -> Vec<(f64, f64)> {
        r[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["round"].as_f64()?, scale * p[key].as_f64()?)))
            .collect()
    };
    let mut body = String::new();
    body += &svg_chart(&curve("accuracy", 100.0), 480.0, 220.0, "test accuracy (%)");
    body += &svg_chart(&curve("loss", 1.0), 480.0, 220.0, "loss (mean over peers)");
    body += &format!("<pre>{}</pre>", escape(&markdown(r)));
    let title = escape(&cell(&r["run"]));
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Testnet run {title}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:1.5em}}figure{{display:inline-block;margin:0 1em 1em 0}}\
         pre{{font-size:12px}}h1{{word-break:break-all}}</style></head><body><h1>Testnet run {title}</h1>{body}</body></html>\n"
    )
}

/// An empty report to fill in: the sections every run has.
pub fn skeleton(run: &str, config: &str) -> Value {
    json!({
        "run": run,
        "config": config,
        "peers": [],
        "rounds": 0,
        "seconds": 0.0,
        "accuracy": [],
        "loss": [],
        "throughput": {},
        "faults": [],
        "chain": null,
    })
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// The report as Markdown.
pub fn markdown(r: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Testnet run {}\n", cell(&r["run"]));
    let _ = writeln!(
        md,
        "{} rounds in {:.1} s; final test accuracy {}.\n",
        cell(&r["rounds"]),
        r["seconds"].as_f64().unwrap_or(0.0),
        r["accuracy"].as_array().and_then(|a| a.last()).map_or("-".to_owned(), |p| format!(
            "{:.2}% (round {})",
            100.0 * p["accuracy"].as_f64().unwrap_or(0.0),
            cell(&p["round"])
        ))
    );
    let _ = writeln!(md, "## Configuration\n\n```toml\n{}```\n", r["config"].as_str().unwrap_or_default());
    let _ = writeln!(md, "## Peers\n\n| peer | peer id | rounds completed | exit |\n|---|---|---|---|");
    for p in r["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            cell(&p["name"]),
            cell(&p["peer_id"]),
            cell(&p["rounds"]),
            cell(&p["exit"])
        );
    }
    let t = &r["throughput"];
    let _ = writeln!(
        md,
        "\n## Throughput\n\nmean {:.0} samples/s over the ring, median round {:.3} s, {:.2} MiB sent per peer per round.\n",
        t["samples_per_s"].as_f64().unwrap_or(0.0),
        t["median_round_s"].as_f64().unwrap_or(0.0),
        t["mib_per_peer_round"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(md, "## Accuracy\n\n| round | test accuracy |\n|---|---|");
    for p in r["accuracy"].as_array().into_iter().flatten() {
        let _ = writeln!(md, "| {} | {:.2}% |", cell(&p["round"]), 100.0 * p["accuracy"].as_f64().unwrap_or(0.0));
    }
    let _ = writeln!(md, "\n## Loss (mean over peers)\n\n| round | loss |\n|---|---|");
    for p in r["loss"].as_array().into_iter().flatten() {
        let _ = writeln!(md, "| {} | {:.4} |", cell(&p["round"]), p["loss"].as_f64().unwrap_or(f64::NAN));
    }
    let _ = writeln!(md, "\n## Faults\n");
    match r["faults"].as_array().filter(|f| !f.is_empty()) {
        None => {
            let _ = writeln!(md, "None.");
        }
        Some(faults) => {
            let _ = writeln!(md, "| seen by | round | accused | kind | reason |\n|---|---|---|---|---|");
            for f in faults {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    cell(&f["seen_by"]),
                    cell(&f["round"]),
                    cell(&f["accused"]),
                    cell(&f["kind"]),
                    cell(&f["reason"])
                );
            }
        }
    }
    let _ = writeln!(md, "\n## On chain\n");
    let chain = &r["chain"];
    if chain.is_null() {
        let _ = writeln!(md, "Nothing recorded (run without a chain).");
        return md;
    }
    let _ = writeln!(md, "| peer id | address | epochs | rounds | samples | faults |\n|---|---|---|---|---|---|");
    for p in chain["contributions"]["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            cell(&p["peer_id"]),
            cell(&p["address"]),
            cell(&p["epochs"]),
            cell(&p["rounds"]),
            cell(&p["samples"]),
            cell(&p["faults"])
        );
    }
    let _ = writeln!(md, "\n| finalized round | parameter hash | votes | block |\n|---|---|---|---|");
    for c in chain["checkpoints"]["checkpoints"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            cell(&c["round"]),
            cell(&c["param_hash"]),
            cell(&c["votes"]),
            cell(&c["block"])
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_markdown_shows_every_section_with_its_figures() {
        let mut r = skeleton("0xab", "name = \"t\"\n");
        r["rounds"] = json!(10);
        r["peers"] = json!([{"name": "peer-0", "peer_id": "12D3", "rounds": 10, "exit": 0}]);
        r["accuracy"] = json!([{"round": 9, "accuracy": 0.7512}]);
        r["loss"] = json!([{"round": 0, "loss": 2.3}, {"round": 9, "loss": 0.9}]);
        r["throughput"] = json!({"samples_per_s": 1000.0, "median_round_s": 0.1, "mib_per_peer_round": 0.5});
        r["chain"] = json!({"contributions": {"peers": [{"peer_id": "12D3", "address": "0x1", "epochs": 1,
            "rounds": 10, "samples": 640, "faults": 0}]}, "checkpoints": {"checkpoints": [{"round": 9,
            "param_hash": "0xff", "votes": 1, "block": 7}]}});
        let page = html(&r);
        assert_eq!(page.matches("<polyline").count(), 1, "the loss is drawn; one accuracy point is not");
        assert!(page.contains("test accuracy (%): fewer than two points") && page.contains("75.12%"));
        let md = markdown(&r);
        for want in [
            "final test accuracy 75.12% (round 9)",
            "| peer-0 | 12D3 | 10 | 0 |",
            "| 12D3 | 0x1 | 1 | 10 | 640 | 0 |",
            "| 9 | 0xff | 1 | 7 |",
            "None.",
            "1000 samples/s",
        ] {
            assert!(md.contains(want), "{want} in\n{md}");
        }
    }
}
