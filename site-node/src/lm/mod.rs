//! Language models at the site.

pub mod lora;
