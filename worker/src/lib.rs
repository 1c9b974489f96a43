//! placeholder during dependency build
pub mod decode;
pub mod features;
pub mod model;
