//! `init`: print a commented configuration with every setting and its default.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// Print a commented config (TOML) with every setting and its default.
///
/// Typical use: `ddisco-controller init > ddisco.toml`. The management key
/// is taken from ~/.ssh/id_ed25519.pub or ~/.ssh/id_rsa.pub when present.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Write to this file instead of standard output (refuses to overwrite).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

pub fn exec(args: InitArgs) -> anyhow::Result<ExitCode> {
    let key = std::env::var_os("HOME").and_then(|home| {
        ["id_ed25519.pub", "id_rsa.pub"]
            .iter()
            .find_map(|f| std::fs::read_to_string(PathBuf::from(&home).join(".ssh").join(f)).ok())
    });
    let text = crate::config::template(key.as_deref());
    match args.output {
        None => print!("{text}"),
        Some(path) => {
            if path.exists() {
                anyhow::bail!("{} exists already; not overwriting it", path.display());
            }
            std::fs::write(&path, text)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
