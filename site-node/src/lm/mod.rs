//! Language models at the site (issue 17): each piece in its own module.

pub mod tokenizer;
