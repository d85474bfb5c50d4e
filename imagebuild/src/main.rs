//! `basalt`: builds Basalt images. Argument parsing only; the work is in the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use basalt_imagebuild::build::{BuildOptions, build};
use basalt_imagebuild::{bundle, devices, flash, inject, outputs, run};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "basalt",
    version,
    about = "Build, flash and update Basalt images"
)]
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
        /// Output directory; the image is <out>/<name>.img, beside .img.zst, .bmap, SHA256SUMS.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// The init binary (static, for the board's architecture); else $BASALT_INIT.
        #[arg(long)]
        init: Option<PathBuf>,
        /// A node config to put on the ESP as node.toml.
        #[arg(long)]
        node_config: Option<PathBuf>,
        /// Extra output format: `qcow2` (needs qemu-img).
        #[arg(long, value_parser = ["qcow2"])]
        format: Option<String>,
        /// Only the raw .img (no .img.zst, .bmap, SHA256SUMS).
        #[arg(long)]
        raw_only: bool,
        /// Print how long each step took (to stderr).
        #[arg(long, short)]
        verbose: bool,
    },
    /// Write an image to an SD card, disk or file, then put a node config on it.
    Flash {
        /// Image: .img, .img.zst or .img.xz; a path or an http(s) URL.
        image: String,
        /// Target: a whole block device (/dev/sdX, /dev/mmcblkN) or a file.
        target: PathBuf,
        /// Node config to inject: a node.toml, or a directory of cloud-init files.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Set the node's hostname in the injected config.
        #[arg(long)]
        hostname: Option<String>,
        /// Skip reading back and checking what was written.
        #[arg(long)]
        no_verify: bool,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Allow a non-removable disk (never the system disk).
        #[arg(long)]
        force: bool,
    },
    /// List removable disks (candidate flash targets).
    Devices {
        /// Show every disk, not just removable ones.
        #[arg(long)]
        all: bool,
    },
    /// Boot an image in QEMU with the serial console attached.
    Run {
        image: PathBuf,
        /// `x86_64` (UEFI, OVMF) or `aarch64` (a Raspberry Pi image on QEMU's raspi3b).
        #[arg(long, default_value = "x86_64")]
        arch: String,
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Accelerator: `auto` (KVM if /dev/kvm opens), `kvm` or `tcg`.
        #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
        accel: String,
        /// Host port forwarded to the node's Kubernetes API (6443).
        #[arg(long, default_value_t = 6443)]
        api_port: u16,
        /// Host port forwarded to the node's SSH (22).
        #[arg(long, default_value_t = 2222)]
        ssh_port: u16,
        /// Write to the image (default: a throw-away overlay).
        #[arg(long)]
        persist: bool,
    },
    /// Node config tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Make an Ed25519 signing key pair for bundles: <prefix>.key and <prefix>.pub.
    Keygen { prefix: PathBuf },
    /// Build a signed update bundle from an image definition (`basalt bundle verify` checks one).
    #[command(args_conflicts_with_subcommands = true)]
    Bundle {
        #[command(subcommand)]
        cmd: Option<BundleCmd>,
        /// Image definition (TOML), as for `basalt build`.
        definition: Option<PathBuf>,
        /// Board whose default definition to bundle (only without a definition).
        #[arg(long, conflicts_with = "definition")]
        board: Option<String>,
        /// Secret key made by `basalt keygen` (<prefix>.key).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The bundle file to write.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The init binary (static, for the board's architecture); else $BASALT_INIT.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Override the definition's os_version (e.g. to make a newer bundle).
        #[arg(long)]
        os_version: Option<String>,
    },
    /// Pin an image definition's packages and Kubernetes binary in basalt.lock beside it.
    Lock {
        /// Image definition (TOML). Without it, the board's embedded default (lock in the current directory).
        definition: Option<PathBuf>,
        /// Board whose default definition to lock (only without a definition).
        #[arg(long, conflicts_with = "definition")]
        board: Option<String>,
        /// sha256 of the Kubernetes binary, instead of downloading it to hash it.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Look at Alpine repositories: resolve, search, info.
    Packages {
        #[command(subcommand)]
        cmd: PackagesCmd,
    },
}

#[derive(clap::Args)]
struct RepoArgs {
    /// Repository: <mirror>/<branch>/<repo> URL or local directory, optionally `@tag <url|dir>`.
    #[arg(long = "repo", required = true)]
    repos: Vec<String>,
    /// apk architecture: x86_64, aarch64, armv7, armhf.
    #[arg(long)]
    arch: String,
    /// Directory of extra trusted signing keys (*.rsa.pub).
    #[arg(long)]
    keys: Option<PathBuf>,
    /// Accept repositories whose index is unsigned or signed by an unknown key.
    #[arg(long)]
    allow_untrusted: bool,
}

#[derive(Subcommand)]
enum PackagesCmd {
    /// Print the resolved set of PKG…, one name-version per line, sorted.
    Resolve {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(required = true)]
        packages: Vec<String>,
    },
    /// Packages whose name or description contains PATTERN.
    Search {
        pattern: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// A package's index record (newest version).
    Info {
        name: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Check a node.toml or a cloud-init directory with the device's own parser.
    Check {
        /// A node.toml, a cloud-init file, or a directory of them.
        config: PathBuf,
    },
    /// Print the documented node config schema.
    Schema,
    /// Write a node config into an image's (or flashed device's) config partition.
    Inject {
        image: PathBuf,
        /// A node.toml, or a directory of cloud-init files.
        config: Option<PathBuf>,
        #[arg(long)]
        hostname: Option<String>,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Check a bundle's signature and every payload hash; exit 0 only if it would install.
    Verify {
        bundle: PathBuf,
        /// Trusted public key(s) (minisign .pub files).
        #[arg(long, required = true)]
        pubkey: Vec<PathBuf>,
    },
}

fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => {
            Ok(Some(v.trim().parse::<u64>().with_context(|| {
                format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")
            })?))
        }
        _ => Ok(None),
    }
}

fn confirm(question: &str) -> Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
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
            format,
            raw_only,
            verbose,
        } => {
            let opts = BuildOptions {
                definition,
                board,
                out,
                init,
                source_date_epoch: source_date_epoch()?,
                node_config,
                progress: std::io::stderr().is_terminal(),
                os_version: None,
            };
            let report = build(&opts).context("basalt build failed")?;
            if verbose {
                for (step, took) in &report.steps {
                    eprintln!("{:>8.2} s  {step}", took.as_secs_f64());
                }
            }
            println!(
                "{} ({} MiB; root {} KiB, initramfs {} KiB with {} modules)",
                report.image.display(),
                report.size / (1024 * 1024),
                report.root_bytes / 1024,
                report.initramfs_bytes / 1024,
                report.modules.len()
            );
            if !raw_only {
                let threads = std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1);
                let files = outputs::write_all(&report.image, format.is_some(), threads)
                    .context("writing the image outputs")?;
                for f in &files[1..] {
                    println!("{}", f.display());
                }
            }
            Ok(())
        }
        Cmd::Lock {
            definition,
            board,
            sha256,
        } => lock_cmd(definition.as_deref(), board.as_deref(), sha256.as_deref()),
        Cmd::Packages { cmd } => packages_cmd(cmd),
        Cmd::Flash {
            image,
            target,
            config,
            hostname,
            no_verify,
            yes,
            force,
        } => flash_cmd(
            &image,
            &target,
            config.as_deref(),
            hostname.as_deref(),
            !no_verify,
            yes,
            force,
        ),
        Cmd::Devices { all } => {
            let disks = devices::list_disks(&devices::HostPaths::default());
            let shown: Vec<_> = disks.iter().filter(|d| all || d.removable).collect();
            if shown.is_empty() {
                eprintln!(
                    "no removable disks found{}",
                    if all { "" } else { " (--all shows every disk)" }
                );
            }
            for d in shown {
                println!("{}", d.describe());
            }
            Ok(())
        }
        Cmd::Run {
            image,
            arch,
            memory,
            cpus,
            accel,
            api_port,
            ssh_port,
            persist,
        } => {
            let assets = std::env::var_os("BASALT_ASSETS").map(PathBuf::from);
            let opts = run::RunOptions {
                image,
                arch,
                memory_mib: memory,
                accel,
                cpus,
                api_port,
                ssh_port,
                persist,
                vars: None,
                extra: Vec::new(),
            };
            let mut cmd = run::command(&opts, assets.as_deref())?;
            eprintln!(
                "basalt: booting {} (Kubernetes API on 127.0.0.1:{api_port}, SSH on 127.0.0.1:{ssh_port}; Ctrl-A X quits)",
                opts.image.display()
            );
            // QEMU replaces this process: a signal for `basalt run` (Ctrl-C
            // aside, which QEMU gets too) reaches QEMU, and no VM outlives it
            // (with a child QEMU, killing basalt left the VM running).
            use std::os::unix::process::CommandExt;
            let e = cmd.exec();
            Err(e).context("starting QEMU")
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { config },
        } => match basalt_init::nodeconfig::load_dir_or_file(&config) {
            Ok(_) => {
                println!("{}: OK", config.display());
                Ok(())
            }
            Err(diags) => {
                for d in &diags {
                    eprintln!("{d}");
                }
                eprintln!("{}: {} error(s)", config.display(), diags.len());
                std::process::exit(1);
            }
        },
        Cmd::Config {
            cmd: ConfigCmd::Schema,
        } => {
            print!("{}", basalt_init::nodeconfig::schema_doc());
            Ok(())
        }
        Cmd::Config {
            cmd:
                ConfigCmd::Inject {
                    image,
                    config,
                    hostname,
                },
        } => {
            if config.is_none() && hostname.is_none() {
                bail!(
                    "nothing to inject: give a config (node.toml or cloud-init directory) or --hostname"
                );
            }
            let files = inject::config_files(config.as_deref(), hostname.as_deref())?;
            inject::inject(&image, &files, source_date_epoch()?.unwrap_or(0))
                .with_context(|| format!("injecting the node config into {}", image.display()))?;
            for (name, _) in &files {
                println!("{}: wrote {name}", image.display());
            }
            Ok(())
        }
        Cmd::Keygen { prefix } => {
            let (key, pubkey) = bundle::keygen(&prefix)?;
            println!(
                "secret key: {} (keep it offline)\npublic key: {}",
                key.display(),
                pubkey.display()
            );
            Ok(())
        }
        Cmd::Bundle {
            cmd: None,
            definition,
            board,
            key,
            out,
            init,
            os_version,
        } => {
            let (Some(key), Some(out)) = (key, out) else {
                bail!("basalt bundle needs --key <prefix>.key and --out <file>");
            };
            if let Some(v) = &os_version
                && (v.is_empty()
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-+~".contains(c)))
            {
                bail!("--os-version {v:?} must use only letters, digits and . _ - + ~");
            }
            let opts = BuildOptions {
                definition,
                board,
                out: out.parent().map(Path::to_path_buf).unwrap_or_default(),
                init,
                source_date_epoch: source_date_epoch()?,
                node_config: None,
                progress: std::io::stderr().is_terminal(),
                os_version,
            };
            let m = bundle::build_bundle(&opts, &key, &out).context("basalt bundle failed")?;
            let size: u64 = m.payloads.iter().map(|p| p.size).sum();
            println!(
                "{}: board {}, version {}, {} payloads, {} KiB",
                out.display(),
                m.board,
                m.os_version,
                m.payloads.len(),
                size / 1024
            );
            Ok(())
        }
        Cmd::Bundle {
            cmd: Some(BundleCmd::Verify { bundle, pubkey }),
            ..
        } => {
            let mut keys = Vec::new();
            for p in &pubkey {
                keys.push(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                );
            }
            let f = std::fs::File::open(&bundle)
                .with_context(|| format!("opening {}", bundle.display()))?;
            let mut r = std::io::BufReader::new(f);
            let m = basalt_init::bundle::verify_stream(&mut r, &keys)
                .with_context(|| format!("bundle {} is not valid", bundle.display()))?;
            println!(
                "{}: OK (board {}, version {}, {} payloads)",
                bundle.display(),
                m.board,
                m.os_version,
                m.payloads.len()
            );
            Ok(())
        }
    }
}

fn flash_cmd(
    image: &str,
    target: &Path,
    config: Option<&Path>,
    hostname: Option<&str>,
    verify: bool,
    yes: bool,
    force: bool,
) -> Result<()> {
    let source = flash::ImageSource::parse(image);
    // Check the config before touching the target: a bad config must lose nothing.
    let files = if config.is_some() || hostname.is_some() {
        Some(inject::config_files(config, hostname)?)
    } else {
        None
    };
    let meta = std::fs::metadata(target).ok();
    let is_block = meta
        .as_ref()
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if is_block {
        let real = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let size = source.known_size().unwrap_or(0);
        let disk = devices::check_target(&devices::HostPaths::default(), &name, size, force)
            .with_context(|| format!("refusing to write {}", target.display()))?;
        if !yes {
            if !std::io::stdin().is_terminal() {
                bail!(
                    "refusing to write {} without confirmation: no terminal to ask on (pass --yes)",
                    target.display()
                );
            }
            eprintln!("{}", disk.describe());
            if !confirm(&format!(
                "Erase everything on {} and write {image}?",
                target.display()
            ))? {
                bail!("not confirmed: nothing written");
            }
        }
    } else if let Some(m) = &meta
        && !m.is_file()
    {
        bail!(
            "{} is neither a block device nor a regular file",
            target.display()
        );
    }
    let quiet = !std::io::stderr().is_terminal() && std::env::var_os("CI").is_some();
    let started = std::time::Instant::now();
    let report = flash::flash(&source, target, verify, quiet)
        .with_context(|| format!("flashing {image} to {}", target.display()))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}: wrote {} of {} ({}) in {secs:.1} s{}{}",
        target.display(),
        devices::human_size(report.bytes_written),
        devices::human_size(report.image_size),
        if report.used_bmap {
            "bmap"
        } else {
            "zero blocks skipped where possible"
        },
        if report.direct_io { ", O_DIRECT" } else { "" },
        if report.verified { ", verified" } else { "" }
    );
    if let Some(files) = files {
        inject::inject(target, &files, source_date_epoch()?.unwrap_or(0))
            .with_context(|| format!("injecting the node config into {}", target.display()))?;
        for (name, _) in &files {
            println!("{}: wrote {name}", target.display());
        }
    }
    Ok(())
}

fn lock_cmd(definition: Option<&Path>, board: Option<&str>, sha256: Option<&str>) -> Result<()> {
    use basalt_imagebuild::board::Board;
    use basalt_imagebuild::imagedef::ImageDefinition;
    use basalt_imagebuild::{lock, packages};
    use basalt_rootfs::apk::{Cache, repo::HttpTransport};
    if let Some(s) = sha256
        && (s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()))
    {
        bail!("--sha256 {s:?} is not 64 hex digits");
    }
    let def = match definition {
        Some(p) => ImageDefinition::load(p)?,
        None => ImageDefinition::embedded_default(board.unwrap_or("x86_64"))?,
    };
    let board = Board::load(&def.board, &def.base_dir)?;
    let path = lock::path_for(&def);
    let mut l = lock::Lock::read(&path)?.unwrap_or_else(lock::Lock::new);
    let cache = Cache::default_location()?;
    let a = packages::make_lock(
        &def,
        &board,
        sha256,
        &HttpTransport::default(),
        &cache,
        &mut l,
    )
    .context("basalt lock failed")?;
    l.write(&path)?;
    println!(
        "{}: {} packages for {}{}",
        path.display(),
        a.packages.len(),
        board.alpine_arch,
        match &a.kubernetes {
            Some(k) => format!(", {} {} sha256 {}", k.distribution, k.version, k.sha256),
            None => String::new(),
        }
    );
    Ok(())
}

fn packages_cmd(cmd: PackagesCmd) -> Result<()> {
    use basalt_imagebuild::packages;
    let (repo, what) = match &cmd {
        PackagesCmd::Resolve { repo, .. } => (repo, "resolve"),
        PackagesCmd::Search { repo, .. } => (repo, "search"),
        PackagesCmd::Info { repo, .. } => (repo, "info"),
    };
    let repos = packages::cli_repos(&repo.repos, repo.allow_untrusted);
    let keys = packages::cli_keys(repo.keys.as_deref())?;
    let indexes = packages::cli_indexes(&repos, &repo.arch, &keys)
        .with_context(|| format!("basalt packages {what} failed"))?;
    match &cmd {
        PackagesCmd::Resolve { packages: pkgs, .. } => {
            for id in packages::cli_resolve(&repos, &indexes, &repo.arch, pkgs)? {
                println!("{id}");
            }
        }
        PackagesCmd::Search { pattern, .. } => {
            for (r, index) in repos.iter().zip(&indexes) {
                for p in index.search(pattern) {
                    println!(
                        "{}  {}  ({})",
                        p.id(),
                        p.description,
                        r.location(&repo.arch, "").trim_end_matches('/')
                    );
                }
            }
        }
        PackagesCmd::Info { name, .. } => {
            let found = repos
                .iter()
                .zip(&indexes)
                .filter_map(|(r, i)| i.newest(name).map(|p| (r, p)))
                .max_by(|a, b| basalt_rootfs::apk::version::compare(&a.1.version, &b.1.version));
            let Some((r, p)) = found else {
                bail!("no package named {name} in {}", repo.repos.join(", "));
            };
            let mut rec = String::new();
            p.write_record(&mut rec);
            print!("{rec}");
            println!(
                "repository: {}",
                r.location(&repo.arch, "").trim_end_matches('/')
            );
        }
    }
    Ok(())
}
