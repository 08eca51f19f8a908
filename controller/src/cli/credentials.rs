//! `credentials`: a client certificate for the cluster's Dask (mutual TLS).

use super::ConfigArgs;
use super::client::AdminClient;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Write a client certificate for the cluster's Dask scheduler (which
/// accepts mutual TLS only) and print the `Security` to connect with.
/// The key is written readable by you alone.
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// Folder to write ca.pem, client.pem and client.key into (created
    /// 0700). Default: <state_dir>/client.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Who it is for (the certificate's name: "dask client NAME").
    #[arg(long, default_value = "user")]
    pub name: String,
    /// Days it is valid.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn exec(args: CredentialsArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let mut client = AdminClient::connect(&cfg.admin_socket()).await?;
    let c = client.credentials(&args.name, args.days).await?;
    let dir = args.out.unwrap_or_else(|| cfg.state_dir.join("client"));
    write_private_dir(&dir)?;
    let (ca, cert, key) = (dir.join("ca.pem"), dir.join("client.pem"), dir.join("client.key"));
    crate::pki::write_private(&ca, &c.ca_pem)?;
    crate::pki::write_private(&cert, &c.cert_pem)?;
    crate::pki::write_private(&key, &c.key_pem)?;
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    eprintln!(
        "wrote {}, {} and {} (valid {} days; the key is yours alone: keep it so)",
        ca.display(),
        cert.display(),
        key.display(),
        args.days
    );
    println!("from distributed import Client");
    println!("from distributed.security import Security");
    println!(
        "security = Security(tls_ca_file={}, tls_client_cert={}, tls_client_key={}, require_encryption=True)",
        q(&ca),
        q(&cert),
        q(&key)
    );
    if c.scheduler.is_empty() {
        println!("# the scheduler is not ready yet: see `ddisco-controller status` for its tls:// address");
    } else {
        println!("client = Client({:?}, security=security)", c.scheduler);
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates `dir` (mode 0700) or checks an existing one is a directory.
pub fn write_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => anyhow::bail!("cannot create {}: {e} (choose another with --out)", dir.display()),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}
