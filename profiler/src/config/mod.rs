//! The daemon's configuration: the command line ([`cli`]) and the configuration file
//! ([`file`]), each validated into the typed options of the modules below.
pub mod cli;
pub mod file;

pub use cli::{Cli, Command, ConfigError, check_duration};
pub use file::Settings;
