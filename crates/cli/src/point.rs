//! `cdp point resolve GROUP POINT`: which journal seq a point name stands for.

use anyhow::Context;
use cdp_appliance::control::{request, Request};
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
    /// The consistency group.
    group: String,
    /// The point (relative points such as `-5m` are values, not flags).
    #[arg(allow_hyphen_values = true)]
    point: String,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    json: bool,
}

pub fn run(command: PointCommand) -> anyhow::Result<()> {
    let PointCommand::Resolve(args) = command;
    let answer = crate::runtime()?.block_on(request(
        &args.control.socket(),
        &Request::PointResolve {
            group: Some(args.group),
            point: args.point.clone(),
        },
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let r = &answer["resolved"];
    let seq = r["seq"].as_u64().context("unexpected answer: no seq")?;
    let time = r["time"].as_str().context("unexpected answer: no time")?;
    println!("{} -> seq {seq} at {time}", args.point);
    Ok(())
}
