//! A minimal bootable image from the host's busybox-static (Debian package
//! `busybox-static`, installed by scripts/install-vm.sh).

use std::collections::BTreeSet;
use std::process::Command;

use crate::{config_json, LayerBuilder, Pusher};

/// Where Debian's busybox-static puts its statically linked binary.
pub const BUSYBOX: &str = "/bin/busybox";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n";
const GROUP: &str = "root:x:0:\nbuilder:x:1000:\n";

enum Entry {
    Dir { mode: u32, owner: u64 },
    File { data: Vec<u8>, mode: u32 },
    Symlink(&'static str),
}

/// The applets `busybox --list` prints, without `busybox` itself.
fn applets() -> Vec<String> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("{BUSYBOX} --list (Debian package busybox-static): {e}"));
    assert!(out.status.success(), "{BUSYBOX} --list: {}", out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect()
}

/// The host's architecture as image configs name it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Pushes `REPO:TAG` to the registry: one layer with /bin/busybox (from the host's
/// busybox-static), symlinks /bin/sh and every applet `busybox --list` prints (skip
/// `busybox` itself) pointing at it, /etc/passwd with root and
/// `builder:x:1000:1000::/home/builder:/bin/sh`, /etc/group, /tmp (1777), plus
/// `extra_files` (path, contents, mode); image config Env PATH=/bin:/usr/bin. Returns
/// the manifest digest.
///
/// Also in the layer: the home directories /etc/passwd names (/root 0700, /home/builder
/// owned by 1000:1000). Extra files are owned by root; a leading `/` is optional; their
/// missing parent directories are added (0755, root); one at the path of a default entry
/// (e.g. `etc/passwd`, `bin/sh`) replaces it. The manifest is Docker v2 schema 2, for
/// the host's architecture, with `Cmd ["/bin/sh"]`.
pub async fn push_busybox_image(
    registry_host: &str,
    repo: &str,
    tag: &str,
    extra_files: &[(&str, &[u8], u32)],
) -> String {
    push_busybox_image_with_auth(registry_host, repo, tag, extra_files, None).await
}

/// [`push_busybox_image`] to a registry that wants an `Authorization` header
/// (e.g. `Basic …` for htpasswd).
pub async fn push_busybox_image_with_auth(
    registry_host: &str,
    repo: &str,
    tag: &str,
    extra_files: &[(&str, &[u8], u32)],
    auth: Option<String>,
) -> String {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("reading {BUSYBOX} (Debian package busybox-static, see scripts/install-vm.sh): {e}")
    });

    let dir = |path: &str, mode, owner| (path.to_string(), Entry::Dir { mode, owner });
    let file = |path: &str, data: Vec<u8>, mode| (path.to_string(), Entry::File { data, mode });
    let mut entries: Vec<(String, Entry)> = vec![
        dir("bin/", 0o755, 0),
        dir("etc/", 0o755, 0),
        dir("tmp/", 0o1777, 0),
        dir("root/", 0o700, 0),
        dir("home/", 0o755, 0),
        dir("home/builder/", 0o755, 1000),
        file("bin/busybox", busybox, 0o755),
        file("etc/passwd", PASSWD.into(), 0o644),
        file("etc/group", GROUP.into(), 0o644),
    ];
    let mut links = BTreeSet::from(["sh".to_string()]);
    links.extend(applets());
    for applet in links {
        // Relative, so the links also resolve with the image mounted somewhere else.
        entries.push((format!("bin/{applet}"), Entry::Symlink("busybox")));
    }

    let mut dirs: BTreeSet<String> = entries
        .iter()
        .filter(|(_, e)| matches!(e, Entry::Dir { .. }))
        .map(|(p, _)| p.clone())
        .collect();
    for (path, data, mode) in extra_files {
        let path = path.trim_start_matches('/').to_string();
        assert!(
            !path.is_empty() && !path.ends_with('/'),
            "extra file {path:?}"
        );
        entries.retain(|(p, _)| *p != path);
        let mut parent = String::new();
        let parents = path.rsplit_once('/').map_or("", |(p, _)| p);
        for part in parents.split('/').filter(|p| !p.is_empty()) {
            parent.push_str(part);
            parent.push('/');
            if dirs.insert(parent.clone()) {
                entries.push(dir(&parent, 0o755, 0));
            }
        }
        entries.push(file(&path, data.to_vec(), *mode));
    }

    let mut layer = LayerBuilder::default();
    for (path, entry) in &entries {
        layer = match entry {
            Entry::Dir { mode, owner } => layer.dir_mode(path, *mode, *owner),
            Entry::File { data, mode } => layer.file_mode(path, data, *mode, 0),
            Entry::Symlink(target) => layer.symlink(path, target),
        };
    }

    // Docker checks rootfs.diff_ids against the uncompressed layers.
    let mut config = config_json(oci_arch(), &["PATH=/bin:/usr/bin"], "/", "");
    config["rootfs"]["diff_ids"] = serde_json::json!([crate::sha256(&layer.tar())]);
    Pusher::new(registry_host, auth)
        .image(repo, tag, config, &[layer.gz()])
        .await
}
