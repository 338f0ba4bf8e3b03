//! Where a build's time went: Bazel's JSON profile (`--profile=FILE`),
//! summed by task, and the server's `/metrics` (the stages of
//! `ExecutedActionMetadata`, the executor's whole handling, Execute calls),
//! as means per action. `--bazel-profile FILE [--metrics-file FILE]`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Deserialize)]
struct Profile {
    #[serde(rename = "traceEvents")]
    trace_events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    cat: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    ph: String,
    /// Microseconds.
    dur: Option<f64>,
}

/// Categories of Bazel's profiler that make up a spawn's life, local or
/// remote (`ProfilerTask` descriptions in Bazel 2.1 to 7).
fn interesting(cat: &str) -> bool {
    let c = cat.to_ascii_lowercase();
    c.contains("remote")
        || c.contains("upload")
        || c == "local action execution"
        || c == "action processing"
        || c.contains("sandbox")
        || c.contains("fetch")
}

/// Per (category, name): how many, and their durations in ms.
pub fn profile_tasks(path: &Path) -> Result<BTreeMap<(String, String), Vec<f64>>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        !text.starts_with(&[0x1f, 0x8b]),
        "{} is gzipped; give Bazel a --profile name without .gz",
        path.display()
    );
    let profile: Profile = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a Bazel JSON profile", path.display()))?;
    let mut tasks: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for e in profile.trace_events {
        let Some(dur) = e.dur else { continue };
        if e.ph != "X" || !interesting(&e.cat) {
            continue;
        }
        // Action names carry the target; group by the kind of work.
        let name = if e.cat == "action processing" {
            e.name.split_whitespace().next().unwrap_or("").to_string()
        } else {
            e.name
        };
        tasks.entry((e.cat, name)).or_default().push(dur / 1000.0);
    }
    Ok(tasks)
}

fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn print_profile(path: &Path) -> Result<()> {
    let tasks = profile_tasks(path)?;
    println!("Bazel profile {}:", path.display());
    println!(
        "| {:<34} | {:<28} | {:>6} | {:>9} | {:>8} | {:>8} |",
        "category", "task", "count", "total s", "mean ms", "p50 ms"
    );
    println!(
        "|{:-<36}|{:-<30}|{:->8}|{:->11}|{:->10}|{:->10}|",
        "", "", "", "", "", ""
    );
    for ((cat, name), mut durs) in tasks {
        let total: f64 = durs.iter().sum();
        let n = durs.len();
        println!(
            "| {:<34} | {:<28} | {:>6} | {:>9.2} | {:>8.2} | {:>8.2} |",
            cat,
            name.chars().take(28).collect::<String>(),
            n,
            total / 1000.0,
            total / n as f64,
            p50(&mut durs)
        );
    }
    Ok(())
}

/// Sum and count of every histogram in a Prometheus text exposition, by
/// its name and labels as written (`name{labels}`).
pub fn histograms(text: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_at(series.find('{').unwrap_or(series.len()));
        if let Some(base) = name.strip_suffix("_sum") {
            out.entry(format!("{base}{labels}")).or_default().0 = value;
        } else if let Some(base) = name.strip_suffix("_count") {
            out.entry(format!("{base}{labels}")).or_default().1 = value;
        }
    }
    out
}

pub fn print_metrics(path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    println!(
        "Server and executor ({}), means per action:",
        path.display()
    );
    println!(
        "| {:<90} | {:>6} | {:>8} |",
        "histogram", "count", "mean ms"
    );
    println!("|{:-<92}|{:->8}|{:->10}|", "", "", "");
    for (series, (sum, count)) in histograms(&text) {
        let wanted = series.starts_with("hearth_execution_stage_seconds")
            || series.starts_with("hearth_queue_wait_seconds")
            || (series.starts_with("hearth_grpc_request_duration_seconds")
                && [
                    "Execute\"",
                    "GetActionResult\"",
                    "FindMissingBlobs\"",
                    "Read\"",
                    "Write\"",
                    "BatchUpdateBlobs\"",
                    "BatchReadBlobs\"",
                ]
                .iter()
                .any(|m| series.contains(&format!("method=\"{m}"))));
        if wanted && count > 0.0 {
            println!(
                "| {series:<90} | {count:>6} | {:>8.2} |",
                sum / count * 1000.0
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_pair_sums_with_counts_by_labels() {
        let text = "# TYPE x histogram\n\
            x_bucket{stage=\"a\",le=\"0.1\"} 3\n\
            x_sum{stage=\"a\"} 0.5\nx_count{stage=\"a\"} 4\n\
            y_sum 2\ny_count 1\n";
        let h = histograms(text);
        assert_eq!(h["x{stage=\"a\"}"], (0.5, 4.0));
        assert_eq!(h["y"], (2.0, 1.0));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn profile_tasks_group_complete_events_of_interest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"otherData":{},"traceEvents":[
              {"cat":"remote action execution","name":"execute remotely","ph":"X","ts":1,"dur":2000,"pid":1,"tid":2},
              {"cat":"remote action execution","name":"execute remotely","ph":"X","ts":5,"dur":4000,"pid":1,"tid":2},
              {"cat":"action processing","name":"Compiling lib/a.c","ph":"X","ts":1,"dur":1000},
              {"name":"thread_name","ph":"M","pid":1,"tid":2,"args":{"name":"x"}},
              {"cat":"gc notification","name":"gc","ph":"X","ts":1,"dur":5}
            ]}"#,
        )
        .unwrap();
        let t = profile_tasks(&path).unwrap();
        let key = (
            "remote action execution".to_string(),
            "execute remotely".to_string(),
        );
        assert_eq!(t[&key], vec![2.0, 4.0]);
        assert_eq!(
            t[&("action processing".into(), "Compiling".into())],
            vec![1.0]
        );
        assert_eq!(t.len(), 2);
    }
}
