//! `--config FILE`: a TOML file whose tables (`[up]`, `[server]`,
//! `[executor]`, `[status]`) hold the same names as the flags. Its values are
//! inserted before the command-line flags, so flags given on the command line
//! win; list-valued flags (e.g. `property = ["Pool=x"]`) accumulate.

use std::path::Path;

use anyhow::{bail, Context, Result};

pub fn args_with_config_file(args: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))
    else {
        return Ok(args);
    };
    let path = match args[pos].strip_prefix("--config=") {
        Some(p) => p.to_string(),
        None => args
            .get(pos + 1)
            .cloned()
            .context("--config needs a file")?,
    };
    let Some(sub_at) = args
        .iter()
        .skip(1)
        .position(|a| !a.starts_with('-'))
        .map(|i| i + 1)
    else {
        return Ok(args);
    };
    let extra = flags_from_file(Path::new(&path), &args[sub_at])?;
    let mut out = args[..=sub_at].to_vec();
    out.extend(extra);
    out.extend_from_slice(&args[sub_at + 1..]);
    Ok(out)
}

fn flags_from_file(path: &Path, subcommand: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
    let mut flags = Vec::new();
    let Some(table) = doc.get(subcommand) else {
        return Ok(flags);
    };
    let Some(table) = table.as_table() else {
        bail!("{}: [{subcommand}] must be a table", path.display());
    };
    for (key, value) in table {
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => bail!(
                    "{}: [{subcommand}] {key} must be a string, number or boolean",
                    path.display()
                ),
            };
            flags.push(format!("--{key}={text}"));
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn file_values_apply_and_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hearth.toml");
        std::fs::write(
            &file,
            "[up]\nlisten = \"127.0.0.1:2000\"\ndata-dir = \"/tmp/x\"\nproperty = [\"Pool=a\", \"Arch=x86_64\"]\n",
        )
        .unwrap();
        let args: Vec<String> = [
            "hearth",
            "up",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cli = crate::cli::Cli::parse_from(args_with_config_file(args).unwrap());
        let crate::cli::Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(up.server.listen.port(), 3000);
        assert_eq!(up.server.data_dir, std::path::PathBuf::from("/tmp/x"));
        assert_eq!(up.executor.properties.len(), 2);
    }

    #[test]
    fn resource_bounds_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hearth.toml");
        std::fs::write(
            &file,
            "[up]\nac-max-bytes = \"5MB\"\nmax-metadata-blob-bytes = 1000\n\
             partial-upload-idle-secs = 7\npartial-upload-max-bytes = \"1GB\"\n\
             vm-max-memory-mib = 2048\nvm-max-cpus = 2\nvm-max-disk-bytes = \"8GiB\"\n\
             image-cache-max-bytes = \"3GB\"\n",
        )
        .unwrap();
        let args: Vec<String> = ["hearth", "up", "--config", file.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cli = crate::cli::Cli::parse_from(args_with_config_file(args).unwrap());
        let crate::cli::Command::Up(up) = cli.command else {
            panic!("not up")
        };
        let (s, vm) = (&up.server, &up.executor.vm);
        assert_eq!(
            (s.ac_max_bytes, s.max_metadata_blob_bytes),
            (5_000_000, 1000)
        );
        assert_eq!(
            (s.partial_upload_idle_secs, s.partial_upload_max_bytes),
            (7, 1_000_000_000)
        );
        assert_eq!(
            (vm.vm_max_memory_mib, vm.vm_max_cpus, vm.vm_max_disk_bytes),
            (Some(2048), Some(2), 8 << 30)
        );
        assert_eq!(vm.image_cache_max_bytes, 3_000_000_000);
    }
}
