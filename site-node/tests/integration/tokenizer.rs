//! The byte-level BPE tokenizer (`tutela_site_node::lm::tokenizer`): ids identical to Python's
//! `tokenizers` on the corpora, the directory `transformers.AutoTokenizer` loads, lossless
//! encoding of any text and bytes, special-token strings in text, the CLI, and the task gate's
//! check of the tokenizer a job names by digest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tutela_protocol::pb;
use tutela_site_node::agent::{Refusal, TaskGate};
use tutela_site_node::config::DatasetConfig;
use tutela_site_node::dataset::SiteDataset;
use tutela_site_node::lm::tokenizer::site::{SiteTokenizers, TokenizerRefusal};
use tutela_site_node::lm::tokenizer::train::{
    TrainOptions, Trained, read_sequences, train, write_dir,
};
use tutela_site_node::lm::tokenizer::{
    SpecialTokens, TextTokenizer, TokenizerError, file_sha256_hex, sha256_hex,
};

use crate::common::{data_dir, python};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn options(vocab_size: usize) -> TrainOptions {
    TrainOptions {
        vocab_size,
        ..TrainOptions::default()
    }
}

fn trained(inputs: &[PathBuf], vocab_size: usize) -> Trained {
    train(inputs, &options(vocab_size), &|_| {}).unwrap()
}

/// The first `lines` lines of tinyshakespeare.txt, in `dir`.
fn shakespeare_head(dir: &Path, lines: usize) -> PathBuf {
    let text = std::fs::read_to_string(data_dir().join("tinyshakespeare.txt")).unwrap();
    let head: String = text.split_inclusive('\n').take(lines).collect();
    let path = dir.join("head.txt");
    std::fs::write(&path, head).unwrap();
    path
}

/// A small tokenizer trained on ASCII only (the first 2,000 lines of Shakespeare).
fn small_tokenizer(dir: &Path) -> TextTokenizer {
    let t = trained(&[shakespeare_head(dir, 2000)], 600);
    TextTokenizer::from_bytes(t.json.as_bytes(), &SpecialTokens::default()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Parity with Python

#[derive(serde::Deserialize)]
struct PythonReport {
    ids: Vec<Vec<u32>>,
    n_sequences: usize,
    python_model_equal: bool,
    auto_class: String,
    auto_checked: usize,
    auto_ids_equal: bool,
    auto_round_trip: bool,
    auto_special_as_text: bool,
    auto_special_ids: BTreeMap<String, u32>,
}

/// Trains on `corpus` here, then runs tests/python/tokenizer_reference.py on the directory.
fn compare_with_python(corpus: &str, vocab_size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let corpus = data_dir().join(corpus);
    let t = trained(std::slice::from_ref(&corpus), vocab_size);
    let out = dir.path().join("tok");
    let written = write_dir(&t, &SpecialTokens::default(), &out).unwrap();
    assert_eq!(
        file_sha256_hex(&written.tokenizer_json).unwrap(),
        t.sha256()
    );

    let tokenizer =
        TextTokenizer::from_file(&written.tokenizer_json, &SpecialTokens::default()).unwrap();
    let sequences = read_sequences(std::slice::from_ref(&corpus), "text").unwrap();
    let texts: Vec<&str> = sequences.iter().map(String::as_str).collect();
    let ours = tokenizer.encode_many(&texts).unwrap();

    let report_path = dir.path().join("python.json");
    let python = python();
    let output = Command::new(&python)
        .arg(repo().join("tests/python/tokenizer_reference.py"))
        .args([&out, &corpus, &report_path])
        .args(["--vocab-size", &vocab_size.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); set TUTELA_PYTHON", python.display()));
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: PythonReport =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();

    assert_eq!(report.n_sequences, sequences.len());
    let n_ids: usize = ours.iter().map(Vec::len).sum();
    assert!(n_ids > 100_000, "{n_ids} ids: the corpus was not encoded");
    for (i, (a, b)) in ours.iter().zip(&report.ids).enumerate() {
        assert_eq!(a, b, "sequence {i}: our ids differ from Python's");
    }
    assert_eq!(ours.len(), report.ids.len());
    assert!(
        report.python_model_equal,
        "Python's tokenizers, trained with the same settings, learned another vocabulary or merges"
    );
    assert!(report.auto_checked > 0);
    assert!(
        report.auto_ids_equal,
        "AutoTokenizer ({}) gave other ids",
        report.auto_class
    );
    assert!(
        report.auto_round_trip,
        "AutoTokenizer did not decode the text back"
    );
    assert!(report.auto_special_as_text);
    let ids = |role: &str| report.auto_special_ids[role];
    assert_eq!(
        (ids("bos"), ids("eos"), ids("pad")),
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id())
    );
}

#[test]
fn python_gives_the_same_ids_on_tinyshakespeare_and_autotokenizer_loads_the_directory() {
    compare_with_python("tinyshakespeare.txt", 4096);
}

#[test]
fn python_gives_the_same_ids_on_the_synthea_notes_and_autotokenizer_loads_the_directory() {
    compare_with_python("synthea_clinical_notes.jsonl", 2048);
}

// ---------------------------------------------------------------------------------------------
// Lossless encoding

/// A random string drawn from pools that stress a byte-level tokenizer: controls, whitespace
/// runs, Latin-1, combining marks, CJK, 4-byte emoji, any scalar value, special-token strings.
fn random_text(rng: &mut StdRng) -> String {
    let len = rng.random_range(0..48);
    let mut s = String::new();
    for _ in 0..len {
        match rng.random_range(0..8) {
            0 => s.push(char::from(rng.random_range(0u8..0x80))),
            1 => s.push_str(
                [" ", "  ", "\n", "\r\n", "\t", "\u{a0}", "\u{3000}"][rng.random_range(0..7)],
            ),
            2 => s.push(char::from_u32(rng.random_range(0x80..0x250)).unwrap()),
            3 => {
                s.push_str(["e\u{301}", "\u{308}", "\u{200d}", "\u{feff}"][rng.random_range(0..4)])
            }
            4 => s.push(char::from_u32(rng.random_range(0x4e00..0x9fff)).unwrap()),
            5 => s.push(char::from_u32(rng.random_range(0x1f300..0x1faff)).unwrap_or('x')),
            6 => loop {
                if let Some(c) = char::from_u32(rng.random_range(0..0x110000)) {
                    s.push(c);
                    break;
                }
            },
            _ => s.push_str(["<|bos|>", "<|eos|>", "<|pad|>", "<|", "|>"][rng.random_range(0..5)]),
        }
    }
    s
}

#[test]
fn any_text_and_any_bytes_round_trip_through_a_tokenizer_trained_on_ascii() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let mut rng = StdRng::seed_from_u64(17);
    for case in 0..2000 {
        let text = random_text(&mut rng);
        let ids = tok.encode(&text).unwrap();
        assert!(
            !ids.iter().any(|&id| tok.is_special(id)),
            "case {case}: {text:?} encoded to a control id: {ids:?}"
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "case {case}");
        assert_eq!(
            tok.decode_bytes(&ids).unwrap(),
            text.as_bytes(),
            "case {case}"
        );
        let prompt = tok.encode_prompt(&text).unwrap();
        assert_eq!(prompt[0], tok.bos_id());
        assert_eq!(&prompt[1..], &ids[..]);
        assert_eq!(tok.decode(&prompt, true).unwrap(), text, "case {case}");
    }

    // Every byte value has a token of its own, and any byte sequence, UTF-8 or not, comes back
    // exactly from its byte tokens (generation may stop inside a character).
    let byte_ids: Vec<u32> = (0..=255u8).map(|b| tok.byte_id(b)).collect();
    let distinct: std::collections::BTreeSet<u32> = byte_ids.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
    for b in 0..=255u8 {
        assert_eq!(tok.decode_bytes(&[tok.byte_id(b)]).unwrap(), vec![b]);
    }
    for _ in 0..500 {
        let bytes: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
        let ids: Vec<u32> = bytes.iter().map(|&b| tok.byte_id(b)).collect();
        assert_eq!(tok.decode_bytes(&ids).unwrap(), bytes);
        // And the lossy text decoding agrees with std's on the same bytes.
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            String::from_utf8_lossy(&bytes)
        );
    }
    // An id past the vocabulary is an error, not a panic.
    let past = tok.vocab_size() as u32;
    assert!(matches!(
        tok.decode(&[past], false),
        Err(TokenizerError::UnknownId { .. })
    ));
    assert!(tok.decode_bytes(&[past]).is_err());
}

#[test]
fn a_tokenizer_without_the_whole_byte_alphabet_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = trained(&[shakespeare_head(dir.path(), 500)], 400);
    let mut json: serde_json::Value = serde_json::from_str(&t.json).unwrap();
    // The token of byte 0x00 ('Ā' in the byte-level alphabet): no ASCII text merges it.
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    assert!(vocab.remove("\u{100}").is_some());
    let broken = serde_json::to_vec(&json).unwrap();
    match TextTokenizer::from_bytes(&broken, &SpecialTokens::default()) {
        Err(TokenizerError::NotByteComplete { byte: 0 }) => {}
        other => panic!("{other:?}"),
    }
    // Control tokens by other names than the tokenizer has: refused, naming the role.
    let other = SpecialTokens {
        eos: "</s>".into(),
        ..SpecialTokens::default()
    };
    let e = TextTokenizer::from_bytes(t.json.as_bytes(), &other).unwrap_err();
    assert!(e.to_string().contains("\"</s>\" for its eos token"), "{e}");
}

#[test]
fn special_token_strings_in_site_text_are_not_control_ids() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let (bos, eos, pad) = (tok.bos_id(), tok.eos_id(), tok.pad_id());
    assert_eq!((bos, eos, pad), (0, 1, 2));
    let note = "Patient wrote <|eos|> in the form.<|bos|><|pad|>\n<|eos|>";
    let ids = tok.encode(note).unwrap();
    assert!(
        !ids.iter().any(|id| [bos, eos, pad].contains(id)),
        "{ids:?}"
    );
    let document = tok.encode_document(note).unwrap();
    assert_eq!(document[0], bos);
    assert_eq!(document.last(), Some(&eos));
    assert_eq!(document.iter().filter(|&&id| id == eos).count(), 1);
    assert_eq!(document.iter().filter(|&&id| id == bos).count(), 1);
    assert_eq!(tok.decode(&document, true).unwrap(), note);
    // The setting is what makes the difference: the same tokenizer.json without it turns the
    // strings into control ids.
    let mut raw = tok.inner().clone();
    raw.set_encode_special_tokens(false);
    let raw_ids = raw.encode(note, false).unwrap().get_ids().to_vec();
    assert!(
        raw_ids.contains(&eos) && raw_ids.contains(&bos),
        "{raw_ids:?}"
    );
}

#[test]
fn documents_batch_with_right_padding_and_attention_masks() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let texts = ["To be, or not to be", "Ay", ""];
    let batch = tok.batch(&texts, None).unwrap();
    let docs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode_document(t).unwrap())
        .collect();
    assert_eq!(batch.rows, 3);
    assert_eq!(batch.columns, docs[0].len());
    assert_eq!(batch.lengths, docs.iter().map(Vec::len).collect::<Vec<_>>());
    assert_eq!(batch.lengths[2], 2, "an empty text is bos, eos");
    for (r, doc) in docs.iter().enumerate() {
        let row = &batch.input_ids[r * batch.columns..(r + 1) * batch.columns];
        let mask = &batch.attention_mask[r * batch.columns..(r + 1) * batch.columns];
        for c in 0..batch.columns {
            if c < doc.len() {
                assert_eq!((row[c], mask[c]), (i64::from(doc[c]), 1));
            } else {
                assert_eq!((row[c], mask[c]), (i64::from(tok.pad_id()), 0));
            }
        }
    }
    let (ids, mask) = batch.tensors(tch::Device::Cpu);
    assert_eq!(ids.size(), vec![3, batch.columns as i64]);
    assert_eq!(
        mask.sum(tch::Kind::Int64).int64_value(&[]),
        docs.iter().map(|d| d.len() as i64).sum::<i64>()
    );
    let cut = tok.batch(&texts, Some(3)).unwrap();
    assert_eq!((cut.columns, cut.lengths.clone()), (3, vec![3, 3, 2]));
}

// ---------------------------------------------------------------------------------------------
// Training: determinism, files, inputs

#[test]
fn training_is_deterministic_and_written_files_are_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let input = shakespeare_head(dir.path(), 3000);
    let a = trained(std::slice::from_ref(&input), 700);
    let b = trained(std::slice::from_ref(&input), 700);
    assert_eq!(a.json, b.json);
    assert_eq!(a.sha256(), sha256_hex(a.json.as_bytes()));
    assert_eq!(a.vocab_size, 700);
    assert_eq!(a.sequences, 3000);
    assert_ne!(
        trained(std::slice::from_ref(&input), 701).sha256(),
        a.sha256()
    );

    let out = dir.path().join("tok");
    let written = write_dir(&a, &SpecialTokens::default(), &out).unwrap();
    assert_eq!(
        std::fs::read(&written.tokenizer_json).unwrap(),
        a.json.as_bytes()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&written.tokenizer_config_json).unwrap()).unwrap();
    assert_eq!(config["bos_token"], "<|bos|>");
    assert_eq!(config["split_special_tokens"], true);

    let other = trained(std::slice::from_ref(&input), 650);
    let e = write_dir(&other, &SpecialTokens::default(), &out).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    assert_eq!(
        std::fs::read(&written.tokenizer_json).unwrap(),
        a.json.as_bytes()
    );
}

#[test]
fn bad_inputs_are_refused_naming_file_and_line_but_no_text() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("notes.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n\n{\"note\": \"Jane Roe\"}\n").unwrap();
    let e = train(std::slice::from_ref(&jsonl), &options(300), &|_| {}).unwrap_err();
    match &e {
        TokenizerError::Input { path, line, .. } => assert_eq!((path, *line), (&jsonl, 3)),
        other => panic!("{other:?}"),
    }
    let message = e.to_string();
    assert!(
        message.contains("no field \"text\"") && !message.contains("Jane"),
        "{message}"
    );

    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"ok\ncaf\xe9\n").unwrap();
    let e = train(std::slice::from_ref(&latin1), &options(300), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("line 2: is not UTF-8"), "{e}");

    let missing = dir.path().join("absent.txt");
    assert!(matches!(
        train(&[missing], &options(300), &|_| {}),
        Err(TokenizerError::Io { .. })
    ));
    assert!(matches!(
        train(&[], &options(300), &|_| {}),
        Err(TokenizerError::Options(_))
    ));
}

#[test]
fn the_example_jobs_tokenizer_digest_is_rebuilt_from_the_notes() {
    let job = std::fs::read_to_string(repo().join("deploy/jobs/notes_lm_tokenizer.toml")).unwrap();
    let spec = tutela_protocol::job::JobSpec::from_toml_str(&job).unwrap();
    let t = trained(&[data_dir().join("synthea_clinical_notes.jsonl")], 4096);
    assert_eq!(t.vocab_size, 2203);
    assert_eq!(
        spec.model.tokenizer_sha256.as_deref(),
        Some(t.sha256().as_str())
    );
}

// ---------------------------------------------------------------------------------------------
// The CLI

fn tutela_node(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_cli_trains_prints_the_digest_and_explains_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    let text = shakespeare_head(dir.path(), 1500);
    let notes = dir.path().join("notes.jsonl");
    let all_notes =
        std::fs::read_to_string(data_dir().join("synthea_clinical_notes.jsonl")).unwrap();
    let lines: Vec<&str> = all_notes.lines().take(40).collect();
    std::fs::write(&notes, lines.join("\n")).unwrap();
    let out = dir.path().join("tok");
    let output = tutela_node(&[
        "tokenizer".as_ref(),
        "train".as_ref(),
        "--input".as_ref(),
        text.as_os_str(),
        notes.as_os_str(),
        "--vocab-size".as_ref(),
        "500".as_ref(),
        "--special-token".as_ref(),
        "<|sep|>".as_ref(),
        "--special-token".as_ref(),
        "<|eos|>".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let file = out.join("tokenizer.json");
    let digest = file_sha256_hex(&file).unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout, format!("{digest}  {}\n", file.display()));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(&format!("tokenizer_sha256 = \"{digest}\"")),
        "{stderr}"
    );
    let tok = TextTokenizer::from_file(
        &file,
        &SpecialTokens {
            extra: vec!["<|sep|>".into()],
            ..SpecialTokens::default()
        },
    )
    .unwrap();
    assert_eq!(tok.vocab_size(), 500);
    assert_eq!(tok.inner().token_to_id("<|sep|>"), Some(3));

    let output = tutela_node(&["tokenizer".as_ref(), "digest".as_ref(), file.as_os_str()]);
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), stdout);
    // Not a tokenizer: refused.
    let output = tutela_node(&["tokenizer".as_ref(), "digest".as_ref(), notes.as_os_str()]);
    assert!(!output.status.success());

    // A second run into the same directory replaces nothing.
    let output = tutela_node(&[
        "tokenizer".as_ref(),
        "train".as_ref(),
        "--input".as_ref(),
        text.as_os_str(),
        "--vocab-size".as_ref(),
        "300".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("exists already"));
    assert_eq!(file_sha256_hex(&file).unwrap(), digest);

    let output = tutela_node(&[
        "tokenizer".as_ref(),
        "train".as_ref(),
        "--input".as_ref(),
        text.as_os_str(),
        "--vocab-size".as_ref(),
        "100".as_ref(),
        "--output".as_ref(),
        dir.path().join("small").as_os_str(),
    ]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--vocab-size 100 must be at least 259")
    );

    let help = tutela_node(&["tokenizer".as_ref(), "train".as_ref(), "--help".as_ref()]);
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--input",
        "--vocab-size",
        "--special-token",
        "--bos-token",
        "--eos-token",
        "--pad-token",
        "--min-frequency",
        "--text-field",
        "--output",
    ] {
        assert!(
            help.contains(flag),
            "--help does not explain {flag}:\n{help}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The task gate: the job's tokenizer by digest

fn job_naming(tokenizer_sha256: &str) -> String {
    format!(
        r#"
name = "notes-lm"
rounds = 1
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 10.0
[model]
name = "mlp"
hidden = [8]
tokenizer_sha256 = "{tokenizer_sha256}"
[data]
schema = "breast_cancer"
[training]
optimizer = "sgd"
learning_rate = 0.1
local_epochs = 1
batch_size = 32
"#
    )
}

fn initialize(spec: String) -> pb::Task {
    pb::Task {
        task_id: "t1".into(),
        job_id: "job-1".into(),
        kind: pb::TaskKind::Initialize as i32,
        job_spec_toml: spec,
        ..Default::default()
    }
}

/// A dataset whose file is deleted after `prepare`: a task admitted or refused by the gate was
/// decided without reading a record.
fn dataset_without_its_file(dir: &Path) -> Arc<SiteDataset> {
    let csv = dir.join("bc.csv");
    std::fs::copy(data_dir().join("breast_cancer_wisconsin.csv"), &csv).unwrap();
    let config = DatasetConfig {
        path: csv.clone(),
        schema: data_dir().join("breast_cancer.schema.toml"),
        ..Default::default()
    };
    let ds = SiteDataset::prepare("breast_cancer", &config, None).unwrap();
    std::fs::remove_file(&csv).unwrap();
    Arc::new(ds)
}

#[test]
fn the_gate_admits_the_named_tokenizer_and_declines_another_with_both_digests() {
    let dir = tempfile::tempdir().unwrap();
    let held = trained(&[shakespeare_head(dir.path(), 800)], 400);
    let other = trained(&[shakespeare_head(dir.path(), 800)], 401);
    let secret_dir = dir.path().join("site-only-path");
    let written = write_dir(&held, &SpecialTokens::default(), &secret_dir).unwrap();
    let tokenizers = SiteTokenizers::new(vec![written.tokenizer_json.clone()]);
    assert_eq!(tokenizers.check().unwrap()[0].1, held.sha256());
    let datasets = BTreeMap::from([(
        "breast_cancer".to_string(),
        dataset_without_its_file(dir.path()),
    )]);
    let gate = TaskGate::new(datasets.clone()).with_tokenizers(tokenizers);

    // The named tokenizer: admitted, with the bytes that were digested.
    let admitted = gate
        .check_task(&initialize(job_naming(&held.sha256())))
        .unwrap();
    let approved = admitted.tokenizer.expect("the job names a tokenizer");
    assert_eq!(approved.sha256(), held.sha256());
    assert_eq!(approved.json(), held.json.as_bytes());
    approved.load(&SpecialTokens::default()).unwrap();
    // A job without a tokenizer needs none.
    let plain = job_naming(&held.sha256())
        .replace(&format!("tokenizer_sha256 = \"{}\"\n", held.sha256()), "");
    assert!(
        gate.check_task(&initialize(plain))
            .unwrap()
            .tokenizer
            .is_none()
    );

    // Another tokenizer: declined, naming both digests and no path.
    match gate.check_task(&initialize(job_naming(&other.sha256()))) {
        Err(Refusal::Tokenizer(r @ TokenizerRefusal::Differs { .. })) => {
            let why = Refusal::Tokenizer(r).to_string();
            assert!(
                why.contains(&other.sha256()) && why.contains(&held.sha256()),
                "{why}"
            );
            assert!(
                !why.contains("site-only-path") && !why.contains('/'),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }

    // The file replaced on disk after start: the node judges what is there now.
    std::fs::write(&written.tokenizer_json, &other.json).unwrap();
    assert!(
        gate.check_task(&initialize(job_naming(&other.sha256())))
            .is_ok()
    );
    assert!(matches!(
        gate.check_task(&initialize(job_naming(&held.sha256()))),
        Err(Refusal::Tokenizer(TokenizerRefusal::Differs { .. }))
    ));
    // Gone: declined without the path.
    std::fs::remove_file(&written.tokenizer_json).unwrap();
    match gate.check_task(&initialize(job_naming(&held.sha256()))) {
        Err(Refusal::Tokenizer(r @ TokenizerRefusal::Unreadable { number: 1, .. })) => {
            assert!(!r.to_string().contains("site-only-path"), "{r}");
        }
        other => panic!("{other:?}"),
    }

    // A site that holds no tokenizer declines every job that names one.
    let bare = TaskGate::new(datasets);
    assert!(matches!(
        bare.check_task(&initialize(job_naming(&held.sha256()))),
        Err(Refusal::Tokenizer(TokenizerRefusal::NoneHeld { .. }))
    ));
    // A digest that is not one: the job spec is refused, naming the key.
    match bare.check_task(&initialize(job_naming("ABC"))) {
        Err(Refusal::JobSpec(why)) => assert!(why.contains("model.tokenizer_sha256"), "{why}"),
        other => panic!("{other:?}"),
    }
}
