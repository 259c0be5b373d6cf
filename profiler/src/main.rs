use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use profiler::{
    config::{Cli, Command, ConfigError, Settings, check_duration},
    daemon::{self, Plan},
    export::{ArchiveExporter, Exporter, FileExporter},
    kube::Connection,
    labels::{DEFAULT_LABEL_VALUE_LIMIT, Labeler},
    remote,
    server::ServerSettings,
    stages, summary,
};
use profiler_common::Counter;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Record(args) => {
            let sampling = args.sampling.validate(99)?;
            let duration = check_duration("duration", args.duration)?;
            let exporter = FileExporter::new(args.output.clone())?;
            let plan = Plan {
                sampling,
                interval: duration,
                once: true,
                stages: stages::Config {
                    exporters: vec![Box::new(exporter)],
                    remotes: Vec::new(),
                    symbol_cache_bytes: args.symbols.symbol_cache_size,
                    server: ServerSettings::default(),
                    tls: None,
                    labeler: Labeler::default(),
                    label_value_limit: DEFAULT_LABEL_VALUE_LIMIT,
                    kube: None,
                },
            };
            let summary = daemon::run(plan).await?;
            if let Some(failure) = summary.export_failures.first() {
                bail!("the profile was not written: {failure}");
            }
            let report = summary.last.context("no profile was produced")?;
            let processes = report
                .profile
                .sample
                .iter()
                .filter_map(|s| s.label.first().map(|l| l.num))
                .collect::<std::collections::HashSet<_>>()
                .len();
            println!(
                "wrote {}: {} samples from {} processes ({} idle ticks not recorded, {} lost)",
                args.output.display(),
                summary.samples,
                processes,
                summary.counters.get(Counter::Idle),
                summary.counters.get(Counter::RingFull),
            );
            if args.top > 0 {
                let (total, top) = summary::top_functions(&report.profile, args.top);
                print!("{}", summary::render(total, &top));
            }
            Ok(())
        }
        Command::Run(args) => {
            let sampling = args.sampling.validate(19)?;
            let interval = check_duration("interval", args.interval)?;
            if args.retain_count == 0 {
                return Err(ConfigError::RetainCount.into());
            }
            let settings = match &args.config {
                Some(path) => Settings::load(path)?,
                None => Settings::default(),
            };
            let server = args.http.settings();
            let tls = server.check()?;
            let mut identity = remote::Identity::from_environment(sampling.frequency.get());
            if let Some(node) = args.node_name.as_ref().filter(|n| !n.is_empty()) {
                identity.node = node.clone();
            }
            if args.no_archive && settings.exporters.is_empty() && server.listen.is_none() {
                bail!(
                    "--no-archive without exporters in --config and with --http-listen off: profiles would go nowhere"
                );
            }
            let kube = kube_connection(args.node_name.as_deref(), args.kubeconfig.as_deref())?;
            if args.check_config {
                for (name, exporter) in &settings.exporters {
                    remote::check(name, exporter, &identity)?;
                }
                println!(
                    "configuration ok: {} exporter(s){}, endpoint {}",
                    settings.exporters.len(),
                    if args.no_archive { "" } else { " + local archive" },
                    server.listen.map_or("off".to_owned(), |a| a.to_string())
                );
                return Ok(());
            }
            let mut exporters: Vec<Box<dyn Exporter>> = Vec::new();
            if !args.no_archive {
                let archive =
                    ArchiveExporter::new(args.output_dir.clone(), args.retain_count, args.retain_bytes)?;
                tracing::info!(dir = %args.output_dir.display(), interval = ?interval, "writing profiles to the local archive");
                exporters.push(Box::new(archive));
            }
            let mut remotes = Vec::new();
            for (name, config) in &settings.exporters {
                let (exporter, handle, sender) =
                    remote::build(name, config, settings.spool_dir.join(name), &identity)?;
                tracing::info!(exporter = %name, kind = %config.kind, url = %config.url, "sending profiles");
                exporters.push(Box::new(exporter));
                remotes.push((handle, sender));
            }
            let plan = Plan {
                sampling,
                interval,
                once: false,
                stages: stages::Config {
                    exporters,
                    remotes,
                    symbol_cache_bytes: args.symbols.symbol_cache_size,
                    server,
                    tls,
                    labeler: settings.labeler,
                    label_value_limit: settings.label_value_limit,
                    kube: kube.zip(args.node_name.clone()),
                },
            };
            let summary = daemon::run(plan).await?;
            tracing::info!(profiles = summary.profiles, samples = summary.samples, "done");
            Ok(())
        }
    }
}

/// The Kubernetes API connection, when `NODE_NAME` is set: the kubeconfig if given, else the
/// pod's service account. Without credentials the daemon runs on, without pod labels.
fn kube_connection(
    node: Option<&str>,
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<Option<Connection>> {
    let Some(node) = node.filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if let Some(path) = kubeconfig {
        return Ok(Some(Connection::from_kubeconfig(path)?));
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Ok(Some(Connection::in_cluster()?));
    }
    tracing::warn!(
        node,
        "NODE_NAME is set but there is no kubeconfig and no service account: no pod labels"
    );
    Ok(None)
}
