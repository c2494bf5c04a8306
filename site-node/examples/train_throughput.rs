//! Measures local-training throughput of the registry's models on the project's datasets.
//!
//! ```text
//! . scripts/torch-env.sh
//! cargo run --release -p tutela-site-node --example train_throughput -- [threads]
//! ```
//! `threads` sets libtorch's CPU threads (default: libtorch's choice, one per core).

use std::error::Error;
use std::path::PathBuf;

use tutela_site_node::data::{DatasetSchema, Standardizer, load_csv, stratified_split};
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::train::{OptimizerKind, TrainConfig, evaluate, train_local};

fn main() -> Result<(), Box<dyn Error>> {
    if let Some(threads) = std::env::args().nth(1) {
        tch::set_num_threads(threads.parse()?);
    }
    let device = tutela_site_node::default_device();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
    println!(
        "device {device:?}, libtorch CPU threads {}",
        tch::get_num_threads()
    );

    let schema = DatasetSchema::load(data.join("breast_cancer.schema.toml"))?;
    let table = load_csv(data.join("breast_cancer_wisconsin.csv"), &schema)?;
    let split = stratified_split(&table, 0.2, 1)?;
    let standardizer = Standardizer::fit(&split.train)?;
    let (train, test) = (
        standardizer.applied(&split.train)?,
        standardizer.applied(&split.validation)?,
    );
    let spec = ModelSpec::new(vec![30], 2).with_hidden(vec![32, 16]);
    run("mlp", spec, device, &train, &test, 50, 32)?;

    let schema = DatasetSchema::load(data.join("mnist.schema.toml"))?;
    let table = load_csv(data.join("mnist_5k.csv.gz"), &schema)?;
    let split = stratified_split(&table, 0.2, 1)?;
    for channels in [[8, 16], [16, 32]] {
        let spec = ModelSpec::new(schema.input_shape(table.n_features), 10)
            .with_conv_channels(channels)
            .with_hidden(vec![64]);
        run("cnn", spec, device, &split.train, &split.validation, 2, 64)?;
    }
    Ok(())
}

fn run(
    name: &str,
    spec: ModelSpec,
    device: tch::Device,
    train: &tutela_site_node::data::Table,
    test: &tutela_site_node::data::Table,
    epochs: usize,
    batch_size: usize,
) -> Result<(), Box<dyn Error>> {
    let model = Model::new(name, spec.clone(), device, 0)?;
    let config = TrainConfig {
        optimizer: OptimizerKind::Adam,
        learning_rate: 2e-3,
        epochs,
        batch_size,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 0,
    };
    let report = train_local(&model, train, &config)?;
    let eval = evaluate(&model, test)?;
    println!(
        "{name}{} hidden {:?} ({} parameters): {} rows × {epochs} epochs, batch {batch_size}: \
         {:.2} s, {:.0} samples/s; test accuracy {:.3}, loss {:.3} on {} rows",
        if name == "cnn" {
            format!(" channels {:?}", spec.conv_channels)
        } else {
            String::new()
        },
        spec.hidden,
        model.parameter_count(),
        train.n_rows,
        report.seconds,
        report.samples_per_second,
        eval.accuracy,
        eval.loss,
        eval.n
    );
    Ok(())
}
