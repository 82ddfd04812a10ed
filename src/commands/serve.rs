//! `streamdet serve`: the HTTP service.

use std::process::ExitCode;

use super::Failure;
use super::ModelArgs;
use crate::config::Config;
use crate::server;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on [default: server.listen of the configuration, 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
}

pub fn run(args: Args, config: &Config) -> Result<ExitCode, Failure> {
    let detector = args.model.load(config)?;
    let mut config = config.clone();
    config.model.path = args.model.path(&config);
    let listen = args.listen.unwrap_or_else(|| config.server.listen.clone());
    actix_web::rt::System::new().block_on(server::serve(config, listen, detector))?;
    Ok(ExitCode::SUCCESS)
}
