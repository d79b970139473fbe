//! kiln's commands: the command tree (as Docker's CLI lays it out: most commands at the top
//! level, and again in their management groups) and the dispatch to one file per group.
//!
//! The group files know nothing of each other's flags; only this module names them all, so
//! `container inspect`, `image build` or `container run` are routed here, not across groups.

pub mod build;
pub mod container_fs;
pub mod containers;
pub mod debug;
pub mod images;
pub mod registry;
pub mod run;
pub mod setup;
pub mod system;
pub mod volumes;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use kiln_cache::Store;
use kiln_containers::Containers;

use crate::Globals;

/// kiln's subcommands.
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process; its size does not matter
pub enum Cmd {
    #[command(flatten)]
    Store(StoreCmd),
    /// Build an image from a Dockerfile
    Build(Box<build::BuildArgs>),
    /// Run a command in a new container
    Run(Box<run::RunArgs>),
    /// Inspect what the frontend makes of a Dockerfile
    #[command(subcommand)]
    Debug(debug::DebugCmd),
    #[command(flatten)]
    Containers(ContainerCmd),
    #[command(flatten)]
    ContainerFs(FsCmd),
    /// Download an image from a registry
    Pull(registry::PullArgs),
    /// Upload an image to a registry
    Push(registry::PushArgs),
    /// Log in to a registry
    Login(registry::LoginArgs),
    /// Log out from a registry
    Logout(registry::LogoutArgs),
    /// Set up the host (as root): QEMU emulation for other platforms
    #[command(subcommand)]
    Setup(setup::SetupCmd),
}

impl Cmd {
    /// Whether the command mounts filesystems in this process (builds, containers, `cp`,
    /// `export`) and so needs a private mount namespace, entered while single-threaded.
    pub fn needs_private_mounts(&self) -> bool {
        match self {
            Cmd::Build(_) | Cmd::Run(_) => true,
            Cmd::Store(StoreCmd::Image(ImageCmd::Build(_))) => true,
            Cmd::Containers(c) => c.needs_private_mounts(),
            Cmd::ContainerFs(c) => c.needs_private_mounts(),
            _ => false,
        }
    }
}

/// Runs one command.
pub fn run(cmd: Cmd, g: &Globals) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Store(c) => run_store(c, g),
        Cmd::Build(a) => build::run(*a, g),
        Cmd::Run(a) => run::run(*a, g),
        Cmd::Debug(c) => debug::run(c, g),
        Cmd::Containers(c) => run_container(c, g),
        Cmd::ContainerFs(c) => run_fs(c, g),
        Cmd::Pull(a) => registry::pull(a, g),
        Cmd::Push(a) => registry::push(a, g),
        Cmd::Login(a) => registry::login(a),
        Cmd::Logout(a) => registry::logout(a),
        Cmd::Setup(c) => setup::run(c),
    }
}

/// The store commands, flattened into kiln's top level.
#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Import the contents from a tarball to create a filesystem image
    Import(images::ImportArgs),
    /// Load an image from a tar archive or STDIN
    Load(images::LoadArgs),
    /// Save one or more images to a tar archive (streamed to STDOUT by default)
    Save(images::SaveArgs),
    /// List images
    Images(images::ImagesArgs),
    /// Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE
    Tag(images::TagArgs),
    /// Remove one or more images
    Rmi(images::RmiArgs),
    /// Return low-level information on images
    Inspect(containers::InspectArgs),
    /// Show the history of an image
    History(images::HistoryArgs),
    /// Manage images
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage kiln
    #[command(subcommand)]
    System(system::SystemCmd),
    /// Check the store
    #[command(subcommand, name = "store")]
    StoreGroup(system::StoreGroupCmd),
    /// Manage builds (the build cache)
    #[command(subcommand)]
    Builder(system::BuilderCmd),
}

/// `kiln image ...`.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List images
    #[command(alias = "list")]
    Ls(images::ImagesArgs),
    /// Remove one or more images
    #[command(alias = "remove")]
    Rm(images::RmiArgs),
    /// Remove unused images
    Prune(images::PruneArgs),
    /// Display detailed information on one or more images
    Inspect(containers::InspectArgs),
    /// Show the history of an image
    History(images::HistoryArgs),
    /// Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE
    Tag(images::TagArgs),
    /// Import the contents from a tarball to create a filesystem image
    Import(images::ImportArgs),
    /// Load an image from a tar archive or STDIN
    Load(images::LoadArgs),
    /// Save one or more images to a tar archive
    Save(images::SaveArgs),
    /// Build an image from a Dockerfile
    Build(Box<build::BuildArgs>),
    /// Download an image from a registry
    Pull(registry::PullArgs),
    /// Upload an image to a registry
    Push(registry::PushArgs),
}

/// Container subcommands (flattened into the top level, as in Docker).
#[derive(Subcommand, Debug)]
pub enum ContainerCmd {
    /// Create a new container
    Create(Box<run::CreateArgs>),
    /// Start one or more stopped containers
    Start(containers::StartArgs),
    /// Stop one or more running containers
    Stop(containers::StopArgs),
    /// Kill one or more running containers
    Kill(containers::KillArgs),
    /// Restart one or more containers
    Restart(containers::StopArgs),
    /// Remove one or more containers
    Rm(containers::RmArgs),
    /// List containers
    Ps(containers::PsArgs),
    /// Fetch the logs of a container
    Logs(containers::LogsArgs),
    /// Attach local standard input, output, and error streams to a running container
    Attach(containers::AttachArgs),
    /// Block until one or more containers stop, then print their exit codes
    Wait(containers::NamesArgs),
    /// Display the running processes of a container
    Top(containers::TopArgs),
    /// Execute a command in a running container
    Exec(containers::ExecArgs),
    /// List port mappings or a specific mapping for the container
    Port(containers::PortArgs),
    /// Rename a container
    Rename(containers::RenameArgs),
    /// Manage containers
    #[command(subcommand)]
    Container(ContainerGroup),
    /// Show the kiln version information
    Version,
    /// Display system-wide information
    Info,
    /// Run a container under this process as its supervisor (started by `run -d` and `start`)
    #[command(name = "container-supervise", hide = true)]
    Supervise(containers::SuperviseArgs),
}

/// `kiln container ...`: Docker's management group, the same commands as the top level.
#[derive(Subcommand, Debug)]
pub enum ContainerGroup {
    /// Attach local standard input, output, and error streams to a running container
    Attach(containers::AttachArgs),
    /// Create a new image from a container's changes
    Commit(container_fs::CommitArgs),
    /// Copy files/folders between a container and the local filesystem
    Cp(container_fs::CpArgs),
    /// Create a new container
    Create(Box<run::CreateArgs>),
    /// Inspect changes to files or directories on a container's filesystem
    Diff(container_fs::DiffArgs),
    /// Execute a command in a running container
    Exec(containers::ExecArgs),
    /// Export a container's filesystem as a tar archive
    Export(container_fs::ExportArgs),
    /// Display detailed information on one or more containers
    Inspect(containers::InspectArgs),
    /// Kill one or more running containers
    Kill(containers::KillArgs),
    /// Fetch the logs of a container
    Logs(containers::LogsArgs),
    /// List containers
    #[command(visible_alias = "ps", alias = "list")]
    Ls(containers::PsArgs),
    /// List port mappings or a specific mapping for the container
    Port(containers::PortArgs),
    /// Remove all stopped containers
    Prune(containers::PruneArgs),
    /// Rename a container
    Rename(containers::RenameArgs),
    /// Restart one or more containers
    Restart(containers::StopArgs),
    /// Remove one or more containers
    #[command(alias = "remove")]
    Rm(containers::RmArgs),
    /// Run a command in a new container
    Run(Box<run::RunArgs>),
    /// Start one or more stopped containers
    Start(containers::StartArgs),
    /// Stop one or more running containers
    Stop(containers::StopArgs),
    /// Display the running processes of a container
    Top(containers::TopArgs),
    /// Block until one or more containers stop, then print their exit codes
    Wait(containers::NamesArgs),
}

impl ContainerCmd {
    /// Whether the command mounts filesystems and needs a private mount namespace (entered
    /// while the process is single-threaded).
    pub fn needs_private_mounts(&self) -> bool {
        matches!(
            self,
            ContainerCmd::Supervise(_)
                | ContainerCmd::Info
                | ContainerCmd::Container(
                    ContainerGroup::Run(_) | ContainerGroup::Cp(_) | ContainerGroup::Export(_)
                )
        )
    }
}

/// The volume and container-filesystem commands, flattened into kiln's top level.
#[derive(Subcommand, Debug)]
pub enum FsCmd {
    /// Manage volumes
    #[command(subcommand)]
    Volume(volumes::VolumeCmd),
    /// Copy files/folders between a container and the local filesystem
    Cp(container_fs::CpArgs),
    /// Inspect changes to files or directories on a container's filesystem
    Diff(container_fs::DiffArgs),
    /// Export a container's filesystem as a tar archive
    Export(container_fs::ExportArgs),
    /// Create a new image from a container's changes
    Commit(container_fs::CommitArgs),
}

impl FsCmd {
    /// Whether the command mounts a container's filesystem in this process (and so needs a
    /// private mount namespace, entered while single-threaded).
    pub fn needs_private_mounts(&self) -> bool {
        matches!(self, FsCmd::Cp(_) | FsCmd::Export(_))
    }
}

/// Runs one store command.
fn run_store(cmd: StoreCmd, g: &Globals) -> anyhow::Result<ExitCode> {
    use system::{BuilderCmd, StoreGroupCmd, SystemCmd};
    // `store verify` reports the temps of killed processes instead of removing them on open.
    let open = match cmd {
        StoreCmd::StoreGroup(_) => Store::open_as_is,
        _ => Store::open,
    };
    let store =
        open(&g.root).with_context(|| format!("failed to open the store at `{}`", g.root.display()))?;
    match cmd {
        StoreCmd::Import(a) | StoreCmd::Image(ImageCmd::Import(a)) => images::cmd_import(&store, a),
        StoreCmd::Load(a) | StoreCmd::Image(ImageCmd::Load(a)) => images::cmd_load(&store, a),
        StoreCmd::Save(a) | StoreCmd::Image(ImageCmd::Save(a)) => images::cmd_save(&store, a),
        StoreCmd::Images(a) | StoreCmd::Image(ImageCmd::Ls(a)) => images::cmd_images(&store, a),
        StoreCmd::Tag(a) | StoreCmd::Image(ImageCmd::Tag(a)) => images::cmd_tag(&store, a),
        StoreCmd::Rmi(a) | StoreCmd::Image(ImageCmd::Rm(a)) => images::cmd_rmi(&store, a),
        StoreCmd::Inspect(a) => containers::inspect_objects(a, None, &store),
        StoreCmd::Image(ImageCmd::Inspect(a)) => containers::inspect_objects(a, Some("image"), &store),
        StoreCmd::History(a) | StoreCmd::Image(ImageCmd::History(a)) => images::cmd_history(&store, a),
        StoreCmd::Image(ImageCmd::Prune(a)) => images::cmd_prune(&store, a),
        StoreCmd::System(SystemCmd::Df(a)) => system::cmd_df(&store, a),
        StoreCmd::System(SystemCmd::Prune(a)) => system::cmd_system_prune(&store, a),
        StoreCmd::StoreGroup(StoreGroupCmd::Verify(a)) => system::cmd_verify(&store, a),
        StoreCmd::Builder(BuilderCmd::Prune(a)) => system::cmd_builder_prune(&store, a),
        StoreCmd::Builder(BuilderCmd::Du(a)) => system::cmd_builder_du(&store, a),
        StoreCmd::Image(ImageCmd::Build(a)) => build::run(*a, g),
        StoreCmd::Image(ImageCmd::Pull(a)) => registry::pull(a, g),
        StoreCmd::Image(ImageCmd::Push(a)) => registry::push(a, g),
    }
}

/// Runs a container command.
fn run_container(cmd: ContainerCmd, g: &Globals) -> anyhow::Result<ExitCode> {
    // `container X` is `X`.
    let cmd = match cmd {
        ContainerCmd::Container(group) => match group {
            ContainerGroup::Attach(a) => ContainerCmd::Attach(a),
            ContainerGroup::Commit(a) => return run_fs(FsCmd::Commit(a), g),
            ContainerGroup::Cp(a) => return run_fs(FsCmd::Cp(a), g),
            ContainerGroup::Create(a) => ContainerCmd::Create(a),
            ContainerGroup::Diff(a) => return run_fs(FsCmd::Diff(a), g),
            ContainerGroup::Exec(a) => ContainerCmd::Exec(a),
            ContainerGroup::Export(a) => return run_fs(FsCmd::Export(a), g),
            ContainerGroup::Inspect(a) => {
                let store = Store::open(&g.root)?;
                return containers::inspect_objects(a, Some("container"), &store);
            }
            ContainerGroup::Kill(a) => ContainerCmd::Kill(a),
            ContainerGroup::Logs(a) => ContainerCmd::Logs(a),
            ContainerGroup::Ls(a) => ContainerCmd::Ps(a),
            ContainerGroup::Port(a) => ContainerCmd::Port(a),
            ContainerGroup::Prune(a) => ContainerCmd::Container(ContainerGroup::Prune(a)),
            ContainerGroup::Rename(a) => ContainerCmd::Rename(a),
            ContainerGroup::Restart(a) => ContainerCmd::Restart(a),
            ContainerGroup::Rm(a) => ContainerCmd::Rm(a),
            ContainerGroup::Run(a) => return run::run(*a, g),
            ContainerGroup::Start(a) => ContainerCmd::Start(a),
            ContainerGroup::Stop(a) => ContainerCmd::Stop(a),
            ContainerGroup::Top(a) => ContainerCmd::Top(a),
            ContainerGroup::Wait(a) => ContainerCmd::Wait(a),
        },
        other => other,
    };
    if let ContainerCmd::Create(a) = cmd {
        return run::create(*a, g);
    }
    let c = Containers::open(&g.root)?;
    let result = match cmd {
        ContainerCmd::Create(_) => Ok(ExitCode::SUCCESS),
        ContainerCmd::Start(a) => containers::cmd_start(&c, g, a),
        ContainerCmd::Stop(a) => containers::cmd_stop(&c, a),
        ContainerCmd::Restart(a) => containers::cmd_restart(&c, g, a),
        ContainerCmd::Kill(a) => containers::cmd_kill(&c, a),
        ContainerCmd::Rm(a) => containers::cmd_rm(&c, a),
        ContainerCmd::Ps(a) => containers::cmd_ps(&c, a),
        ContainerCmd::Logs(a) => containers::cmd_logs(&c, a),
        ContainerCmd::Attach(a) => containers::cmd_attach(&c, a),
        ContainerCmd::Wait(a) => containers::cmd_wait(&c, a),
        ContainerCmd::Top(a) => containers::cmd_top(&c, a),
        ContainerCmd::Exec(a) => containers::cmd_exec(&c, a),
        ContainerCmd::Port(a) => containers::cmd_port(&c, a),
        ContainerCmd::Container(ContainerGroup::Prune(a)) => containers::cmd_prune(&c, a),
        ContainerCmd::Container(_) => unreachable_group(),
        ContainerCmd::Rename(a) => containers::cmd_rename(&c, a),
        ContainerCmd::Version => system::cmd_version(),
        ContainerCmd::Info => system::cmd_info(&c, g),
        ContainerCmd::Supervise(a) => containers::cmd_supervise(&c, a),
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("Error: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The group's other commands were mapped to top-level ones before dispatch.
fn unreachable_group() -> anyhow::Result<ExitCode> {
    anyhow::bail!("internal error: an unmapped `container` subcommand")
}

/// Runs one of the volume and container-filesystem commands.
fn run_fs(cmd: FsCmd, g: &Globals) -> anyhow::Result<ExitCode> {
    match cmd {
        FsCmd::Volume(v) => volumes::run(v, g),
        FsCmd::Cp(a) => container_fs::cp(a, g),
        FsCmd::Diff(a) => container_fs::diff(a, g),
        FsCmd::Export(a) => container_fs::export(a, g),
        FsCmd::Commit(a) => container_fs::commit(a, g),
    }
}
