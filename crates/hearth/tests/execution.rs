//! Execution through a real `hearth up` and its host executor: stages,
//! outputs of every kind, caching rules, timeouts and rejected actions.
#![allow(deprecated)]

mod common;

use common::*;
use hearth_proto::reapi::{
    execution_stage, Command, Directory, DirectoryNode, SymlinkNode, Tree, WaitExecutionRequest,
};
use hearth_storage::Digest;
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn action_runs_streams_stages_and_is_cached() {
    let h = up(&[]);
    let c = channel(&h).await;
    let mut spec = ActionSpec::new(
        "mkdir -p out && tr a-z A-Z < in.txt > out/up.txt && echo done; echo warn >&2",
    );
    spec.files = vec![("in.txt", b"hello remote")];
    spec.outputs = vec!["out/up.txt"];
    let action = make_action(&c, &spec).await;

    let (ops, resp) = execute(&c, action, false).await.unwrap();
    assert_eq!(
        stage_of(ops.last().unwrap()),
        execution_stage::Value::Completed as i32
    );
    assert!(!resp.cached_result);
    assert_eq!(resp.status.clone().unwrap_or_default().code, 0);
    let result = resp.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "out/up.txt");
    assert_eq!(
        read_blob(&c, result.output_files[0].digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"HELLO REMOTE"
    );
    assert_eq!(
        read_blob(&c, result.stdout_digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"done\n"
    );
    assert_eq!(
        read_blob(&c, result.stderr_digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"warn\n"
    );
    let meta = result.execution_metadata.unwrap();
    assert!(!meta.worker.is_empty());
    for (name, t) in [
        ("queued", &meta.queued_timestamp),
        ("worker_start", &meta.worker_start_timestamp),
        ("input_fetch_start", &meta.input_fetch_start_timestamp),
        (
            "input_fetch_completed",
            &meta.input_fetch_completed_timestamp,
        ),
        ("execution_start", &meta.execution_start_timestamp),
        ("execution_completed", &meta.execution_completed_timestamp),
        ("output_upload_start", &meta.output_upload_start_timestamp),
        (
            "output_upload_completed",
            &meta.output_upload_completed_timestamp,
        ),
        ("worker_completed", &meta.worker_completed_timestamp),
    ] {
        assert!(
            t.as_ref().is_some_and(|t| t.seconds > 0),
            "{name} timestamp missing"
        );
    }

    let (_, again) = execute(&c, action, false).await.unwrap();
    assert!(
        again.cached_result,
        "second run comes from the action cache"
    );
    let (_, forced) = execute(&c, action, true).await.unwrap();
    assert!(!forced.cached_result, "skip_cache_lookup executes again");
}

#[tokio::test]
async fn directories_symlinks_and_legacy_output_fields() {
    let h = up(&[]);
    let c = channel(&h).await;
    let root = upload_msg(&c, &Directory::default()).await;
    let command = Command {
        arguments: vec![
            "/bin/sh".into(),
            "-c".into(),
            "mkdir -p d/sub && echo a > d/a && echo b > d/sub/b && chmod +x d/sub/b && ln -s sub/b d/link \
             && echo f > f.txt && ln -s f.txt flink"
                .into(),
        ],
        working_directory: "work".into(),
        output_files: vec!["f.txt".into(), "flink".into()],
        output_directories: vec!["d".into()],
        ..Default::default()
    };
    let cd = upload_msg(&c, &command).await;
    let action = action_of(&c, cd, root).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    let r = resp.result.unwrap();
    assert_eq!(r.exit_code, 0, "{:?}", resp.status);
    assert_eq!(r.output_files.len(), 1);
    assert_eq!(
        r.output_file_symlinks.len(),
        1,
        "legacy symlink field for output_files"
    );
    assert_eq!(r.output_file_symlinks[0].target, "f.txt");
    assert_eq!(r.output_directories.len(), 1);
    let tree =
        Tree::decode(read_blob(&c, r.output_directories[0].tree_digest.as_ref().unwrap()).await)
            .unwrap();
    let root_dir = tree.root.unwrap();
    let names: Vec<&str> = root_dir.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, vec!["a"]);
    assert_eq!(root_dir.symlinks[0].name, "link");
    assert_eq!(root_dir.directories[0].name, "sub");
    let sub = &tree.children[0];
    assert_eq!(sub.files[0].name, "b");
    assert!(sub.files[0].is_executable);
    assert_eq!(
        read_blob(&c, sub.files[0].digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"b\n"
    );
}

#[tokio::test]
async fn inputs_keep_their_layout_and_executable_bit() {
    let h = up(&[]);
    let c = channel(&h).await;
    let script = b"#!/bin/sh\necho from-tool \"$1\"\n";
    let data = b"nested data";
    upload(&c, &[script, data]).await;
    let mut sub = Directory::default();
    sub.files.push(file_node("data.txt", data, false));
    sub.symlinks.push(SymlinkNode {
        name: "alias".into(),
        target: "data.txt".into(),
        node_properties: None,
    });
    let sub_d = upload_msg(&c, &sub).await;
    let mut root = Directory::default();
    root.files.push(file_node("tool.sh", script, true));
    root.directories.push(DirectoryNode {
        name: "pkg".into(),
        digest: Some(sub_d.to_proto()),
    });
    let root_d = upload_msg(&c, &root).await;
    let command = Command {
        arguments: vec!["../tool.sh".into(), "x".into()],
        working_directory: "pkg".into(),
        output_paths: vec!["report".into()],
        environment_variables: vec![hearth_proto::reapi::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        ..Default::default()
    };
    // The tool prints to stdout; a second command checks the data via the symlink.
    let cd = upload_msg(&c, &command).await;
    let action = action_of(&c, cd, root_d).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    let r = resp.result.unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        read_blob(&c, r.stdout_digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"from-tool x\n"
    );

    let mut spec = ActionSpec::new("test -x tool.sh && test ! -x in.txt && cat in.txt");
    spec.files = vec![("in.txt", b"plain")];
    let a2 = make_action(&c, &spec).await;
    let (_, resp) = execute(&c, a2, false).await.unwrap();
    assert_eq!(
        resp.result.as_ref().unwrap().exit_code,
        1,
        "tool.sh is absent in this action's root"
    );
}

#[tokio::test]
async fn failures_are_not_cached_and_do_not_cache_is_honoured() {
    let h = up(&[]);
    let c = channel(&h).await;
    let fail = make_action(&c, &ActionSpec::new("exit 7")).await;
    let (_, r1) = execute(&c, fail, false).await.unwrap();
    assert_eq!(r1.result.unwrap().exit_code, 7);
    let (_, r2) = execute(&c, fail, false).await.unwrap();
    assert!(!r2.cached_result, "a failed action is not cached");

    let mut spec = ActionSpec::new("date +%N");
    spec.do_not_cache = true;
    let volatile = make_action(&c, &spec).await;
    let (_, a) = execute(&c, volatile, false).await.unwrap();
    let (_, b) = execute(&c, volatile, false).await.unwrap();
    assert!(!a.cached_result && !b.cached_result);
}

#[tokio::test]
async fn timeout_kills_the_action_with_deadline_exceeded() {
    let h = up(&[]);
    let c = channel(&h).await;
    let mut spec = ActionSpec::new("echo started; sleep 30");
    spec.timeout_secs = Some(1);
    let action = make_action(&c, &spec).await;
    let t = std::time::Instant::now();
    let (_, resp) = execute(&c, action, false).await.unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    let status = resp.status.unwrap();
    assert_eq!(
        status.code,
        Code::DeadlineExceeded as i32,
        "{}",
        status.message
    );
    assert!(status.message.contains("timed out"));
    let r = resp.result.unwrap();
    assert_eq!(
        read_blob(&c, r.stdout_digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"started\n"
    );
    let (_, again) = execute(&c, action, false).await.unwrap();
    assert!(!again.cached_result, "a timed-out action is not cached");
}

#[tokio::test]
async fn wait_execution_follows_an_operation_by_name() {
    let h = up(&[]);
    let c = channel(&h).await;
    let action = make_action(&c, &ActionSpec::new("sleep 1; echo late")).await;
    let mut stream = exec(&c)
        .execute(hearth_proto::reapi::ExecuteRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.done);
    drop(stream);
    let mut waited = exec(&c)
        .wait_execution(WaitExecutionRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = waited.message().await.unwrap() {
        last = Some(op);
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(response_of(&last).result.unwrap().exit_code, 0);
    let err = exec(&c)
        .wait_execution(WaitExecutionRequest {
            name: "operations/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn identical_concurrent_executions_share_one_run() {
    let h = up(&[]);
    let c = channel(&h).await;
    let action = make_action(&c, &ActionSpec::new("sleep 1")).await;
    let (a, b) = tokio::join!(execute(&c, action, false), execute(&c, action, false));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.0.last().unwrap().name,
        b.0.last().unwrap().name,
        "one operation for both"
    );
}

#[tokio::test]
async fn missing_inputs_are_failed_precondition_with_violations() {
    let h = up(&[]);
    let c = channel(&h).await;
    let absent = b"this blob was never uploaded";
    let mut root = Directory::default();
    root.files.push(file_node("ghost", absent, false));
    let root_d = upload_msg(&c, &root).await;
    let cmd = upload_msg(
        &c,
        &Command {
            arguments: vec!["true".into()],
            ..Default::default()
        },
    )
    .await;
    let action = action_of(&c, cmd, root_d).await;
    let err = execute(&c, action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let v = violations(&err);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].r#type, "MISSING");
    let d = Digest::of(absent);
    assert_eq!(v[0].subject, format!("blobs/{}/{}", d.hash_hex(), d.size()));

    let err = execute(&c, Digest::of(b"no such action"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

async fn run_tree(c: &Channel, root: Directory) -> tonic::Status {
    let root_d = upload_msg(c, &root).await;
    let cmd = upload_msg(
        c,
        &Command {
            arguments: vec!["true".into()],
            ..Default::default()
        },
    )
    .await;
    let action = action_of(c, cmd, root_d).await;
    execute(c, action, false)
        .await
        .expect_err("the tree must be rejected")
}

#[tokio::test]
async fn malformed_input_trees_are_invalid_argument() {
    let h = up(&[]);
    let c = channel(&h).await;
    upload(&c, &[b"x"]).await;
    for bad in ["..", "a/b", "", "."] {
        let mut root = Directory::default();
        root.files.push(file_node(bad, b"x", false));
        let err = run_tree(&c, root).await;
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "name {bad:?}: {}",
            err.message()
        );
        assert!(
            err.message().contains("single path components"),
            "{}",
            err.message()
        );
    }
    let mut dup = Directory::default();
    dup.files.push(file_node("same", b"x", false));
    dup.symlinks.push(SymlinkNode {
        name: "same".into(),
        target: "x".into(),
        node_properties: None,
    });
    let err = run_tree(&c, dup).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("two entries named"),
        "{}",
        err.message()
    );

    let mut abs = Directory::default();
    abs.symlinks.push(SymlinkNode {
        name: "etc".into(),
        target: "/etc/passwd".into(),
        node_properties: None,
    });
    let err = run_tree(&c, abs).await;
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut sub = Directory::default();
    sub.symlinks.push(SymlinkNode {
        name: "up".into(),
        target: "../../outside".into(),
        node_properties: None,
    });
    let sub_d = upload_msg(&c, &sub).await;
    let mut root = Directory::default();
    root.directories.push(DirectoryNode {
        name: "pkg".into(),
        digest: Some(sub_d.to_proto()),
    });
    let err = run_tree(&c, root).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("climbs out of the input root"),
        "{}",
        err.message()
    );

    // One level up from pkg/ stays inside the root: accepted.
    let mut sub = Directory::default();
    sub.symlinks.push(SymlinkNode {
        name: "up".into(),
        target: "../pkg".into(),
        node_properties: None,
    });
    let sub_d = upload_msg(&c, &sub).await;
    let mut root = Directory::default();
    root.directories.push(DirectoryNode {
        name: "pkg".into(),
        digest: Some(sub_d.to_proto()),
    });
    let root_d = upload_msg(&c, &root).await;
    let cmd = upload_msg(
        &c,
        &Command {
            arguments: vec!["true".into()],
            ..Default::default()
        },
    )
    .await;
    let ok = action_of(&c, cmd, root_d).await;
    assert!(execute(&c, ok, false).await.is_ok());
}

#[tokio::test]
async fn platform_properties_are_checked() {
    let h = up(&[]);
    let c = channel(&h).await;
    let mut spec = ActionSpec::new("true");
    spec.platform = vec![("workload-isolation-type", "docker")];
    let err = execute(&c, make_action(&c, &spec).await, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("workload-isolation-type")
            && err.message().contains("none, firecracker")
    );

    spec.platform = vec![("recycle-runner", "maybe")];
    let err = execute(&c, make_action(&c, &spec).await, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    spec.platform = vec![("Pool", "gpu")];
    let err = execute(&c, make_action(&c, &spec).await, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("Pool"), "{}", err.message());

    // Names are case-insensitive, values trimmed; unknown names are accepted.
    spec.platform = vec![
        ("OSFAMILY", " Linux "),
        ("some-custom-key", "v"),
        ("Workload-Isolation-Type", "none"),
    ];
    let (_, resp) = execute(&c, make_action(&c, &spec).await, false)
        .await
        .unwrap();
    assert_eq!(resp.result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn bad_commands_are_invalid_argument() {
    let h = up(&[]);
    let c = channel(&h).await;
    let root = upload_msg(&c, &Directory::default()).await;
    for (cmd, why) in [
        (
            Command {
                arguments: vec![],
                ..Default::default()
            },
            "arguments is empty",
        ),
        (
            Command {
                arguments: vec!["true".into()],
                output_paths: vec!["../x".into()],
                ..Default::default()
            },
            "output path",
        ),
        (
            Command {
                arguments: vec!["true".into()],
                working_directory: "/abs".into(),
                ..Default::default()
            },
            "working_directory",
        ),
    ] {
        let cd = upload_msg(&c, &cmd).await;
        let action = action_of(&c, cd, root).await;
        let err = execute(&c, action, false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}");
        assert!(err.message().contains(why), "{}: {}", why, err.message());
    }
}

#[tokio::test]
async fn metadata_blobs_over_the_limit_are_invalid_argument() {
    let h = up(&["--max-metadata-blob-bytes", "1000"]);
    let c = channel(&h).await;
    let root = upload_msg(&c, &Directory::default()).await;
    let small = Command {
        arguments: vec!["true".into()],
        ..Default::default()
    };
    // Just under the limit: runs.
    let mut fits = small.clone();
    fits.arguments.push(String::new());
    while fits.encoded_len() < 1000 {
        fits.arguments[1].push('x');
    }
    fits.arguments[1].pop();
    assert_eq!(fits.encoded_len(), 999);
    let action = action_of(&c, upload_msg(&c, &fits).await, root).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    assert_eq!(resp.status.unwrap_or_default().code, 0);
    assert_eq!(resp.result.unwrap().exit_code, 0);

    // One byte over: the Command is refused, naming it and the limit.
    let mut over = fits.clone();
    over.arguments[1].push_str("xx");
    assert_eq!(over.encoded_len(), 1001);
    let over_d = upload_msg(&c, &over).await;
    let action = action_of(&c, over_d, root).await;
    let err = execute(&c, action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("Command")
            && err.message().contains(&over_d.to_string())
            && err.message().contains("1000 bytes")
            && err.message().contains("--max-metadata-blob-bytes"),
        "{}",
        err.message()
    );

    // A Directory over the limit, in the input tree and in GetTree.
    let mut big_dir = Directory::default();
    for i in 0..40 {
        big_dir
            .files
            .push(file_node(&format!("file-{i:04}"), b"", false));
    }
    assert!(big_dir.encoded_len() > 1000);
    let big_dir_d = upload_msg(&c, &big_dir).await;
    let action = action_of(&c, upload_msg(&c, &small).await, big_dir_d).await;
    let err = execute(&c, action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("Directory") && err.message().contains(&big_dir_d.to_string()),
        "{}",
        err.message()
    );
    let err = match cas(&c)
        .get_tree(hearth_proto::reapi::GetTreeRequest {
            root_digest: Some(big_dir_d.to_proto()),
            ..Default::default()
        })
        .await
    {
        Err(e) => e,
        Ok(s) => s.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("1000 bytes"), "{}", err.message());

    // An Action over the limit.
    let action = hearth_proto::reapi::Action {
        command_digest: Some(upload_msg(&c, &small).await.to_proto()),
        input_root_digest: Some(root.to_proto()),
        salt: vec![7; 1000],
        ..Default::default()
    };
    let action_d = upload_msg(&c, &action).await;
    let err = execute(&c, action_d, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("Action"), "{}", err.message());
}
