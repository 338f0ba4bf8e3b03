//! `--shaped-actions N`: the round trip of actions shaped like the build
//! benchmark's compiles (an input tree of headers several directories deep,
//! an executable wrapper, two new outputs), one at a time, so that what is
//! measured is the server's and the executor's own work per action rather
//! than how busy the machine's cores are.

use std::time::Duration;

use anyhow::Result;
use hearth_proto::reapi::{
    command::EnvironmentVariable, Command, Directory, DirectoryNode, FileNode,
};
use hearth_storage::Digest;

use crate::{
    execute_ok, millis_between, nanos, percentile, row, upload_action_in, upload_bytes, upload_msg,
    Channel,
};

/// Headers in the tree, and how deep the output directory is.
const HEADERS: usize = 40;
const DEPTH: usize = 6;

fn file(name: &str, d: Digest, is_executable: bool) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(d.to_proto()),
        is_executable,
        ..Default::default()
    }
}

fn dir(name: &str, d: Digest) -> DirectoryNode {
    DirectoryNode {
        name: name.into(),
        digest: Some(d.to_proto()),
    }
}

/// The input root: `lib/` with the headers and a source, `tools/cc.sh`
/// (executable), and an empty `out/k8/bin/...` chain `DEPTH` deep.
async fn input_root(c: &Channel) -> Result<Directory> {
    let mut lib = Directory::default();
    for i in 0..HEADERS {
        let d = upload_bytes(c, format!("int header_{i}(int);\n").into_bytes()).await?;
        lib.files.push(file(&format!("h{i:02}.h"), d, false));
    }
    let src = upload_bytes(c, b"int main(void) { return 0; }\n".to_vec()).await?;
    lib.files.push(file("src.c", src, false));
    let lib = upload_msg(c, &lib).await?;
    let wrapper = upload_bytes(c, b"#!/bin/sh\nexec \"$@\"\n".to_vec()).await?;
    let tools = upload_msg(
        c,
        &Directory {
            files: vec![file("cc.sh", wrapper, true)],
            ..Default::default()
        },
    )
    .await?;
    let mut chain = upload_msg(c, &Directory::default()).await?;
    for level in (1..DEPTH).rev() {
        chain = upload_msg(
            c,
            &Directory {
                directories: vec![dir(&format!("d{level}"), chain)],
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(Directory {
        directories: vec![dir("lib", lib), dir("out", chain), dir("tools", tools)],
        ..Default::default()
    })
}

pub async fn shaped_actions(c: &Channel, n: usize) -> Result<()> {
    let root = input_root(c).await?;
    let outputs: String = (1..DEPTH).map(|l| format!("d{l}/")).collect();
    let (obj, dep) = (format!("out/{outputs}a.o"), format!("out/{outputs}a.d"));
    let mut times = Vec::with_capacity(n);
    // Sums, in ms: queued, input fetch, execution, output upload, the
    // executor's whole handling.
    let mut stages = [0f64; 5];
    for i in 0..=n {
        // New outputs every time, as a build's compiles have.
        let command = Command {
            arguments: vec![
                "tools/cc.sh".into(),
                "/bin/sh".into(),
                "-c".into(),
                format!("echo \"$RUN\" > {obj}; echo \"$RUN dep\" > {dep}"),
            ],
            environment_variables: vec![EnvironmentVariable {
                name: "RUN".into(),
                value: format!("{}-{i}", uuid::Uuid::new_v4()),
            }],
            output_files: vec![dep.clone(), obj.clone()],
            ..Default::default()
        };
        let action = upload_action_in(c, &root, &command).await?;
        let (took, result) = execute_ok(c, action).await?;
        anyhow::ensure!(result.output_files.len() == 2, "outputs: {result:?}");
        if i > 0 {
            times.push(took);
            let m = result.execution_metadata.unwrap_or_default();
            let spans = [
                (&m.queued_timestamp, &m.worker_start_timestamp),
                (
                    &m.input_fetch_start_timestamp,
                    &m.input_fetch_completed_timestamp,
                ),
                (
                    &m.execution_start_timestamp,
                    &m.execution_completed_timestamp,
                ),
                (
                    &m.output_upload_start_timestamp,
                    &m.output_upload_completed_timestamp,
                ),
                (&m.worker_start_timestamp, &m.worker_completed_timestamp),
            ];
            for (sum, (a, b)) in stages.iter_mut().zip(spans) {
                *sum += millis_between(a, nanos(b));
            }
        }
    }
    times.sort();
    let p = |q| percentile(&times, q);
    row(
        &format!("Compile-shaped action ({} inputs), executed", HEADERS + 2),
        format!("p50 {:.2} ms, p99 {:.2} ms", p(0.5), p(0.99)),
    );
    let mean: Duration = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    let mean = mean.as_secs_f64() * 1000.0;
    row("Compile-shaped action, mean", format!("{mean:.2} ms"));
    let n = times.len().max(1) as f64;
    let names = [
        "queued",
        "input fetch",
        "execution",
        "output upload",
        "executor in all",
    ];
    for (name, sum) in names.iter().zip(stages) {
        row(&format!("  mean {name}"), format!("{:.2} ms", sum / n));
    }
    row(
        "  mean outside the executor (client, server, transport)",
        format!("{:.2} ms", mean - stages[4] / n),
    );
    Ok(())
}
