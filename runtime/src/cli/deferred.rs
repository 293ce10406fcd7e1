//! [`Deferred`]: a subcommand's arguments built only when clap enters that subcommand.

use clap::{ArgMatches, Args, Command, FromArgMatches, Subcommand};

/// A subcommand's arguments (or nested subcommands), built only when clap enters that
/// subcommand. Clap's derive builds every subcommand's arguments before it parses anything,
/// and each `husk` process (every `create`, `start`, monitor and `boot`) runs that code once,
/// mostly cold: where the binary's pages come from slow storage, building the arguments of
/// every subcommand is a large share of a short command's time. Clap's own `Command::defer`
/// does the work; this type lets the derive use it.
#[derive(Debug, Clone)]
pub struct Deferred<T>(pub T);

impl<T: FromArgMatches> FromArgMatches for Deferred<T> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches(matches).map(Deferred)
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches_mut(matches).map(Deferred)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(matches)
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches_mut(matches)
    }
}

impl<T: Args> Args for Deferred<T> {
    fn augment_args(cmd: Command) -> Command {
        cmd.defer(args_keeping_about::<T>)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        cmd.defer(args_for_update_keeping_about::<T>)
    }

    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }
}

/// `T::augment_args`, leaving the subcommand's help text as it was (see `keeping_about`).
fn args_keeping_about<T: Args>(cmd: Command) -> Command {
    keeping_about(cmd, T::augment_args)
}

/// `T::augment_args_for_update`, leaving the subcommand's help text as it was.
fn args_for_update_keeping_about<T: Args>(cmd: Command) -> Command {
    keeping_about(cmd, T::augment_args_for_update)
}

/// Runs `augment` on `cmd` and puts back the help text `cmd` had. The derive sets a
/// subcommand's help from its variant's doc comment right after `augment_args`; run later,
/// through `defer`, `augment_args` would replace it with the doc comment of the arguments' type.
fn keeping_about(cmd: Command, augment: fn(Command) -> Command) -> Command {
    let (about, long_about) = (cmd.get_about().cloned(), cmd.get_long_about().cloned());
    let cmd = augment(cmd);
    let cmd = match about {
        Some(text) => cmd.about(text),
        None => cmd.about(None::<&str>),
    };
    match long_about {
        Some(text) => cmd.long_about(text),
        None => cmd.long_about(None::<&str>),
    }
}

impl<T: Subcommand> Subcommand for Deferred<T> {
    fn augment_subcommands(cmd: Command) -> Command {
        cmd.defer(T::augment_subcommands)
    }

    fn augment_subcommands_for_update(cmd: Command) -> Command {
        cmd.defer(T::augment_subcommands_for_update)
    }

    fn has_subcommand(name: &str) -> bool {
        T::has_subcommand(name)
    }
}
