//! `cdp point resolve GROUP POINT`: which journal seq a point name stands for.

use cdp_control::{PointResolved, Request};
use clap::{Args, Subcommand};

use crate::bookmark::ControlArgs;

#[derive(Subcommand, Debug)]
pub enum PointCommand {
    /// Print the seq and time a point resolves to: a bookmark name, `seq:N` or `N`, an RFC
    /// 3339 time (`2026-11-23T00:10:00.123Z`: the last record at or before it), or a time
    /// relative to now (`-30s`, `-5m`, `-2h`, `-1d`).
    Resolve(ResolveArgs),
}

#[derive(Args, Debug)]
pub struct ResolveArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
    /// The point (relative points such as `-5m` are values, not flags).
    #[arg(allow_hyphen_values = true)]
    point: String,
    /// The older form `point resolve GROUP POINT`, still accepted: then the first word is
    /// the group and this the point.
    #[arg(hide = true, value_name = "LEGACY_POINT", allow_hyphen_values = true)]
    legacy_point: Option<String>,
}

pub fn run(command: PointCommand) -> anyhow::Result<()> {
    let PointCommand::Resolve(args) = command;
    let (group, point) = match (args.group.clone(), args.legacy_point.clone()) {
        (group, None) => (group, args.point.clone()),
        (None, Some(point)) => (Some(args.point.clone()), point),
        (Some(_), Some(_)) => anyhow::bail!(crate::output::CliError::new(
            crate::output::ErrorKind::Usage,
            "give the group once: cdp point resolve --group GROUP POINT"
        )),
    };
    let answer: PointResolved = crate::control_client::appliance(
        &args.control.socket(),
        &Request::PointResolve {
            group,
            point: point.clone(),
        },
    )?;
    if crate::output::json() {
        return crate::output::print_json(&answer);
    }
    let r = &answer.resolved;
    crate::out!("{} -> seq {} at {}", point, r.seq, r.time);
    Ok(())
}
