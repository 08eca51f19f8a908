//! `completions SHELL`: print a shell completion script.

use clap::{Args, CommandFactory};
use clap_complete::Shell;
use std::process::ExitCode;

/// Print a completion script for your shell, e.g.
/// `ddisco-controller completions bash > /etc/bash_completion.d/ddisco-controller`
/// or `ddisco-controller completions zsh > ~/.zfunc/_ddisco-controller`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

pub fn exec(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "ddisco-controller", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
