//! `basalt`: builds Basalt images. Argument parsing only; the work is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use basalt_imagebuild::build::{BuildOptions, build};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "basalt", version, about = "Build Basalt images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a disk image from an image definition (or a board's default one).
    Build {
        /// Image definition (TOML). Without it, the board's embedded default is built.
        definition: Option<PathBuf>,
        /// Board whose default definition to build (only without a definition).
        #[arg(long, conflicts_with = "definition")]
        board: Option<String>,
        /// Output directory; the image is <out>/<name>.img.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// The init binary (static, for the board's architecture); else $BASALT_INIT.
        #[arg(long)]
        init: Option<PathBuf>,
        /// A node config to put on the ESP as node.toml.
        #[arg(long)]
        node_config: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Build {
            definition,
            board,
            out,
            init,
            node_config,
        } => {
            let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
                Ok(v) if !v.is_empty() => Some(v.trim().parse::<u64>().with_context(|| {
                    format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")
                })?),
                _ => None,
            };
            let opts = BuildOptions {
                definition,
                board,
                out,
                init,
                source_date_epoch,
                node_config,
                progress: std::io::stderr().is_terminal(),
            };
            let report = build(&opts).context("basalt build failed")?;
            println!(
                "{} ({} MiB; root {} KiB, initramfs {} KiB with {} modules)",
                report.image.display(),
                report.size / (1024 * 1024),
                report.root_bytes / 1024,
                report.initramfs_bytes / 1024,
                report.modules.len()
            );
            Ok(())
        }
    }
}
