//! The text protection pipeline on the real Synthea clinical notes (`data/synthea_clinical_notes.jsonl`):
//! names and dates redacted, near-duplicates found by SimHash, the content filter, the split by
//! patient, and the report's counts. Numbers the issue asks for are printed (run with
//! `--nocapture` to see them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use regex::Regex;
use tutela_privacy::anonymize::AnonymizeError;
use tutela_privacy::anonymize::text::simhash::{self, SimHashIndex, hamming};
use tutela_privacy::anonymize::text::{
    Blocklist, ContentFilter, FilterScope, NearDuplicateConfig, ProtectedText, SplitUnit,
    TextDeidReport, TextDocument, TextPipeline, TextProtectionConfig, commit_documents,
};

fn notes_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/synthea_clinical_notes.jsonl")
}

/// The notes as documents (id, patient, date, text), read with serde_json here rather than the
/// site node's reader, which has its own tests.
fn notes() -> Vec<TextDocument> {
    let text = std::fs::read_to_string(notes_path()).expect("data/synthea_clinical_notes.jsonl");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let field = |k: &str| v[k].as_str().map(str::to_string);
            TextDocument {
                line: i as u64 + 1,
                id: field("note_id"),
                patient: field("patient_id"),
                date: field("date"),
                text: field("text").expect("a text field"),
            }
        })
        .collect()
}

/// The patients' names, taken from the notes' structure independently of the redactor: the line
/// after the `# History of Present Illness` heading is the patient's name.
fn names_in_notes(docs: &[TextDocument]) -> HashSet<String> {
    const HEADING: &str = "# History of Present Illness\n";
    let mut names = HashSet::new();
    for d in docs {
        let at = d.text.find(HEADING).expect("every note has the heading") + HEADING.len();
        let line = d.text[at..].lines().next().unwrap_or_default().trim();
        assert!(
            !line.is_empty(),
            "line {}: no name after the heading",
            d.line
        );
        names.insert(line.to_string());
    }
    names
}

fn config() -> TextProtectionConfig {
    TextProtectionConfig {
        names: Vec::new(),
        digit_suffixed_names: true,
        content_filter: None,
        near_duplicates: NearDuplicateConfig::default(),
        split_unit: SplitUnit::Patient,
        validation_fraction: 0.2,
        split_seed: 0,
    }
}

fn run(config: TextProtectionConfig, docs: Vec<TextDocument>) -> (ProtectedText, TextDeidReport) {
    TextPipeline::new(config).unwrap().run(docs).unwrap()
}

fn all_texts(p: &ProtectedText) -> Vec<&str> {
    p.train
        .iter()
        .chain(&p.validation)
        .map(|d| d.text.as_str())
        .collect()
}

fn whole_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric())
        .any(|w| w == word)
}

#[test]
fn no_patient_name_from_the_notes_survives_redaction() {
    let docs = notes();
    let names = names_in_notes(&docs);
    assert_eq!(names.len(), 13, "13 fictional patients: {names:?}");
    let tokens: HashSet<String> = names
        .iter()
        .flat_map(|n| n.split_whitespace().map(str::to_string))
        .collect();
    // Occurrences of each name token in the input, for recall.
    let total: usize = docs
        .iter()
        .map(|d| tokens.iter().filter(|t| whole_word(&d.text, t)).count())
        .sum();
    // No dictionary: the digit-suffixed shape alone must catch them; no dedup, every note out.
    let mut c = config();
    c.near_duplicates.enabled = false;
    let (out, report) = run(c, docs.clone());
    let texts = all_texts(&out);
    assert_eq!(texts.len(), docs.len());
    let mut surviving = 0usize;
    for t in &texts {
        for token in &tokens {
            if t.contains(token.as_str()) {
                surviving += 1;
            }
            // The alphabetic stem (`Sumiko` of `Sumiko254`) is gone too, where it is a real word
            // of three letters or more (`An` of `An125` is also an English word).
            let stem = token.trim_end_matches(|c: char| c.is_ascii_digit());
            assert!(
                stem.len() < 3 || !whole_word(t, stem),
                "stem {stem:?} survives in {t:?}"
            );
        }
        assert!(t.contains("[NAME]"));
    }
    let recall = 1.0 - surviving as f64 / total as f64;
    println!(
        "redaction recall on the notes' names: {recall:.4} ({} name-token occurrences in, {surviving} left)",
        total
    );
    assert_eq!(surviving, 0);
    // Dates with a day (the first line of every note) are gone too.
    let iso = Regex::new(r"\b\d{4}-\d{2}-\d{2}\b").unwrap();
    assert!(texts.iter().all(|t| !iso.is_match(t)));
    // The report counts one NAME span per note (given and family names merge into one span) and
    // one DATE span per ISO date in the input.
    let name_runs: usize = docs
        .iter()
        .map(|d| {
            names
                .iter()
                .map(|n| d.text.matches(n.as_str()).count())
                .sum::<usize>()
        })
        .sum();
    let dates: usize = docs.iter().map(|d| iso.find_iter(&d.text).count()).sum();
    assert_eq!(report.redaction.spans.get("NAME"), Some(&name_runs));
    assert_eq!(report.redaction.spans.get("DATE"), Some(&dates));
    assert_eq!(report.redaction.documents_changed, docs.len());
}

#[test]
fn dictionary_names_are_redacted_without_the_digit_shape() {
    let doc = |line: u64, text: &str| TextDocument {
        line,
        id: None,
        patient: None,
        date: None,
        text: text.into(),
    };
    let mut c = config();
    c.names = vec!["Sumiko Larue".into()];
    c.digit_suffixed_names = false;
    c.split_unit = SplitUnit::Document;
    c.near_duplicates.enabled = false;
    c.validation_fraction = 0.5;
    let (out, _) = run(
        c,
        vec![
            doc(
                1,
                "Sumiko Larue is 16. Seen on 2020-03-04, call 555-123-4567.",
            ),
            doc(2, "Larue605 was seen again."),
        ],
    );
    let texts = all_texts(&out);
    assert!(texts.contains(&"[NAME] is 16. Seen on [DATE], call [PHONE]."));
    // Off, the digit-suffixed shape is left alone (it is a configuration choice).
    assert!(texts.contains(&"Larue605 was seen again."));
}

/// A note's shingles as sorted distinct hashes, for an exact Jaccard similarity (the ground
/// truth SimHash approximates), with std's hasher rather than the fingerprint's.
fn shingles(text: &str, n: usize) -> Vec<u64> {
    use std::hash::BuildHasher;
    let state =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    let w = simhash::words(text);
    let n = n.min(w.len()).max(1);
    let mut v: Vec<u64> = w.windows(n).map(|s| state.hash_one(s)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
        }
    }
    let union = a.len() + b.len() - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// The redacted notes, in file order, as the SimHash step sees them (the pipeline's output is
/// ordered by split, so the redactor is run here directly).
fn redacted_notes() -> Vec<TextDocument> {
    let docs = notes();
    let redactor = tutela_privacy::anonymize::PiiRedactor::new(Vec::<String>::new())
        .unwrap()
        .with_digit_suffixed_names(true);
    docs.into_iter()
        .map(|mut d| {
            d.text = redactor.redact(&d.text).0;
            d
        })
        .collect()
}

#[test]
fn simhash_on_the_real_notes_timing_and_false_positives() {
    let docs = redacted_notes();
    let nd = NearDuplicateConfig::default();
    let start = Instant::now();
    let fps: Vec<u64> = docs
        .iter()
        .map(|d| simhash::simhash(&d.text, nd.shingle_words))
        .collect();
    let fingerprinting = start.elapsed();
    let start = Instant::now();
    let mut index = SimHashIndex::new(nd.max_hamming);
    let mut kept: Vec<usize> = Vec::new();
    let mut matched: Vec<(usize, usize)> = Vec::new();
    for (i, &fp) in fps.iter().enumerate() {
        match index.find_near(fp) {
            Some(k) => matched.push((i, kept[k])),
            None => {
                index.insert(fp);
                kept.push(i);
            }
        }
    }
    let indexing = start.elapsed();
    let n = docs.len() as u64;
    println!(
        "SimHash on {n} notes: fingerprints {fingerprinting:?}, index {indexing:?}, {} candidate \
         comparisons (all pairs: {}), {} near-duplicates dropped at max_hamming {}, {} kept",
        index.comparisons(),
        n * (n - 1) / 2,
        matched.len(),
        nd.max_hamming,
        kept.len()
    );
    // False positives: a dropped note whose exact shingle Jaccard with the note it matched is
    // below 0.5, i.e. notes that share less than half their shingles.
    let sh: Vec<Vec<u64>> = docs
        .iter()
        .map(|d| shingles(&d.text, nd.shingle_words))
        .collect();
    let mut sims: Vec<f64> = matched
        .iter()
        .map(|&(i, j)| jaccard(&sh[i], &sh[j]))
        .collect();
    sims.sort_by(f64::total_cmp);
    let false_positives = sims.iter().filter(|s| **s < 0.5).count();
    println!(
        "false positives (Jaccard < 0.5) among {} drops: {false_positives}; lowest Jaccard of a drop: {:.3}, median {:.3}",
        sims.len(),
        sims.first().copied().unwrap_or(1.0),
        sims.get(sims.len() / 2).copied().unwrap_or(1.0)
    );
    // Over every pair of notes: pairs that share less than half their shingles within the
    // threshold (false positives), and pairs sharing 90% or more that are not (misses).
    let (mut far, mut far_close, mut near, mut near_close) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..docs.len() {
        for j in i + 1..docs.len() {
            let similarity = jaccard(&sh[i], &sh[j]);
            let close = hamming(fps[i], fps[j]) <= nd.max_hamming;
            if similarity < 0.5 {
                far += 1;
                far_close += u64::from(close);
            } else if similarity >= 0.9 {
                near += 1;
                near_close += u64::from(close);
            }
        }
    }
    println!(
        "pairs with Jaccard < 0.5: {far}, within max_hamming: {far_close}; pairs with Jaccard >= 0.9: {near}, within max_hamming: {near_close} ({:.1}%)",
        100.0 * near_close as f64 / near.max(1) as f64
    );
    assert_eq!(false_positives, 0);
    // One pair in about half a million at the default threshold (measured: 1).
    assert!(far_close as f64 <= 1e-5 * far as f64);
    assert!(near_close as f64 >= 0.95 * near as f64);
    // The index compares far fewer pairs than all pairs.
    assert!(index.comparisons() < n * (n - 1) / 2 / 10);
}

/// Edits a note a little: `changes` words replaced, whitespace re-flowed.
fn perturb(text: &str, changes: usize) -> String {
    let mut words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    let step = words.len() / (changes + 1);
    for k in 1..=changes {
        words[k * step] = format!("changed{k}");
    }
    // Re-flow: double spaces, tabs and line breaks in new places.
    words
        .chunks(7)
        .map(|c| c.join("  "))
        .collect::<Vec<_>>()
        .join("\n\t")
}

#[test]
fn simhash_removes_planted_near_duplicates_and_keeps_distinct_notes() {
    let nd = NearDuplicateConfig::default();
    // The distinct notes: those SimHash keeps among the real ones (each pair differs in more
    // than max_hamming bits), with the longer ones chosen as hosts for planted copies.
    let docs = redacted_notes();
    let fps: Vec<u64> = docs
        .iter()
        .map(|d| simhash::simhash(&d.text, nd.shingle_words))
        .collect();
    let kept: Vec<usize> = simhash::dedup(&fps, nd.max_hamming)
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_none())
        .map(|(i, _)| i)
        .collect();
    let distinct: Vec<TextDocument> = kept.iter().map(|&i| docs[i].clone()).collect();
    let hosts: Vec<&TextDocument> = distinct
        .iter()
        .filter(|d| d.text.len() > 1500)
        .take(40)
        .collect();
    assert!(hosts.len() >= 20, "{} long notes", hosts.len());
    // Per host: one copy with only its whitespace re-flowed, one with 1, 2 or 3 words changed
    // (and re-flowed). Undated: considered after every dated note, so the original stays.
    let copy = |k: usize, d: &TextDocument, changes: usize| TextDocument {
        line: 100_000 + k as u64,
        id: Some(format!("planted-{k}")),
        patient: d.patient.clone(),
        date: None,
        text: perturb(&d.text, changes),
    };
    let mut planted: Vec<(usize, TextDocument)> = Vec::new();
    for (k, d) in hosts.iter().enumerate() {
        planted.push((0, copy(2 * k, d, 0)));
        let changes = 1 + k % 3;
        planted.push((changes, copy(2 * k + 1, d, changes)));
    }
    let mut input = distinct.clone();
    input.extend(planted.iter().map(|(_, d)| d.clone()));
    let mut c = config();
    c.near_duplicates = nd.clone();
    let (out, report) = run(c, input);
    let texts: HashSet<&str> = all_texts(&out).into_iter().collect();
    // Every distinct note stays.
    for d in &distinct {
        assert!(
            texts.contains(d.text.as_str()),
            "a distinct note was dropped"
        );
    }
    // Caught copies, by number of words changed.
    let mut caught: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (changes, d) in &planted {
        let e = caught.entry(*changes).or_insert((0, 0));
        e.1 += 1;
        // The pipeline redacts the copy again, which leaves it as it is (its name and date are
        // placeholders already): a copy that survived is in the output verbatim.
        if !texts.contains(d.text.as_str()) {
            e.0 += 1;
        }
    }
    println!("planted near-duplicates caught (words changed: caught/planted): {caught:?}");
    let dropped: usize = caught.values().map(|(c, _)| c).sum();
    assert_eq!(report.near_duplicates.unwrap().documents_dropped, dropped);
    assert_eq!(
        report.documents_out,
        distinct.len() + planted.len() - dropped
    );
    assert_eq!(
        caught[&0].0, caught[&0].1,
        "whitespace-only copies are identical to SimHash"
    );
    // SimHash is a sketch: a few changed words move a fingerprint by a random number of bits
    // (mean about 2.5 per changed word on these notes), so a few copies escape; measured 35/40.
    let changed: (usize, usize) = caught
        .iter()
        .filter(|(k, _)| **k > 0)
        .fold((0, 0), |acc, (_, v)| (acc.0 + v.0, acc.1 + v.1));
    assert!(changed.0 * 10 >= changed.1 * 8, "{changed:?}");
}

#[test]
fn content_filter_drops_documents_or_lines_and_counts_them() {
    let docs = notes();
    // "Medicaid" as a whole word, any case, counted here by a separate method.
    let has = |t: &str| {
        t.split(|c: char| !c.is_alphanumeric())
            .any(|w| w.eq_ignore_ascii_case("medicaid"))
    };
    let with_term = docs.iter().filter(|d| has(&d.text)).count();
    let lines_with_term: usize = docs
        .iter()
        .map(|d| d.text.split('\n').filter(|l| has(l)).count())
        .sum();
    assert!(with_term > 0 && with_term < docs.len(), "{with_term}");
    let source = "# test blocklist\nmedicaid\n";
    let filter = |scope| ContentFilter {
        blocklist: Blocklist::parse(source, "blocklist").unwrap(),
        scope,
        source_sha256: "test".into(),
    };
    let mut c = config();
    c.near_duplicates.enabled = false;
    c.content_filter = Some(filter(FilterScope::Document));
    let (out, report) = run(c.clone(), docs.clone());
    let f = report.content_filter.clone().unwrap();
    assert_eq!(f.documents_dropped, with_term);
    assert_eq!(f.terms, 1);
    assert_eq!(report.documents_out, docs.len() - with_term);
    assert!(all_texts(&out).iter().all(|t| !has(t)));

    c.content_filter = Some(filter(FilterScope::Line));
    let (out, report) = run(c, docs.clone());
    let f = report.content_filter.unwrap();
    assert_eq!(f.documents_dropped, 0);
    assert_eq!(f.lines_dropped, lines_with_term);
    assert_eq!(f.documents_emptied, 0);
    assert_eq!(report.documents_out, docs.len());
    assert!(all_texts(&out).iter().all(|t| !has(t)));
    // The rest of each note is still there.
    assert!(
        all_texts(&out)
            .iter()
            .all(|t| t.contains("# Chief Complaint"))
    );
}

#[test]
fn split_by_patient_keeps_every_patient_on_one_side_and_is_deterministic() {
    let docs = notes();
    let mut c = config();
    c.near_duplicates.enabled = false;
    let (a, report) = run(c.clone(), docs.clone());
    let train_units: HashSet<u32> = a.train.iter().map(|d| d.unit).collect();
    let validation_units: HashSet<u32> = a.validation.iter().map(|d| d.unit).collect();
    assert!(train_units.is_disjoint(&validation_units));
    assert_eq!(report.split.train_units, train_units.len());
    assert_eq!(report.split.validation_units, validation_units.len());
    assert_eq!(train_units.len() + validation_units.len(), 13);
    // Independently of the unit index: the name left in a note is redacted, but each note's
    // patient can be recovered from the input by its text, which is unique per patient here.
    let patient_of: HashMap<String, String> = {
        let redactor = tutela_privacy::anonymize::PiiRedactor::new(Vec::<String>::new())
            .unwrap()
            .with_digit_suffixed_names(true);
        let mut by_text: HashMap<String, HashSet<String>> = HashMap::new();
        for d in &docs {
            by_text
                .entry(redactor.redact(&d.text).0)
                .or_default()
                .insert(d.patient.clone().unwrap());
        }
        // Only texts that name one patient (identical notes of two patients would say nothing).
        by_text
            .into_iter()
            .filter(|(_, p)| p.len() == 1)
            .filter_map(|(t, p)| p.into_iter().next().map(|p| (t, p)))
            .collect()
    };
    assert!(patient_of.len() > docs.len() / 2);
    let side_patients = |side: &[tutela_privacy::anonymize::text::ProtectedDocument]| {
        side.iter()
            .filter_map(|d| patient_of.get(&d.text).cloned())
            .collect::<HashSet<String>>()
    };
    assert!(side_patients(&a.train).is_disjoint(&side_patients(&a.validation)));
    // The validation share is at most the fraction of notes (one patient has 708 of 1215).
    assert!(a.validation.len() as f64 <= 0.2 * docs.len() as f64 + 0.5);
    assert!(!a.validation.is_empty());
    // Deterministic: same seed, same split, whatever the order of the file.
    let mut reversed = docs.clone();
    reversed.reverse();
    let (b, _) = run(c.clone(), reversed);
    let set = |p: &ProtectedText| {
        p.validation
            .iter()
            .map(|d| d.text.clone())
            .collect::<HashSet<_>>()
    };
    assert_eq!(set(&a), set(&b));
    let (again, _) = run(c.clone(), docs.clone());
    assert_eq!(a, again);
    // Another seed gives another split (checked over a few seeds: 13 patients, one may collide).
    let differs = (1..6).any(|seed| {
        let mut c2 = c.clone();
        c2.split_seed = seed;
        set(&run(c2, docs.clone()).0) != set(&a)
    });
    assert!(differs);
    // By patient with a document that has none: refused, naming the line, never a value.
    let mut broken = docs.clone();
    broken[41].patient = None;
    let err = TextPipeline::new(c).unwrap().run(broken).unwrap_err();
    assert!(
        matches!(err, AnonymizeError::BadCell { row: 42, ref column, .. } if column == "patient"),
        "{err}"
    );
}

#[test]
fn report_counts_add_up_and_commitment_follows_the_documents() {
    let mut docs = notes();
    // Two empty documents and one near-duplicate of the first note.
    for k in 0..2 {
        docs.push(TextDocument {
            line: 5000 + k,
            id: Some(format!("empty-{k}")),
            patient: docs[0].patient.clone(),
            date: None,
            text: " \n\t".into(),
        });
    }
    let mut c = config();
    c.content_filter = Some(ContentFilter {
        blocklist: Blocklist::parse("Medicaid\n", "blocklist").unwrap(),
        scope: FilterScope::Document,
        source_sha256: "test".into(),
    });
    let (out, report) = run(c.clone(), docs.clone());
    let f = report.content_filter.as_ref().unwrap();
    let nd = report.near_duplicates.as_ref().unwrap();
    assert_eq!(report.documents_in, docs.len());
    assert_eq!(report.empty_documents, 2);
    assert_eq!(
        report.documents_in,
        report.empty_documents
            + f.documents_dropped
            + f.documents_emptied
            + nd.documents_dropped
            + report.documents_out
    );
    assert_eq!(report.documents_out, out.train.len() + out.validation.len());
    assert_eq!(report.split.train_documents, out.train.len());
    assert_eq!(report.split.validation_documents, out.validation.len());
    println!(
        "notes: {} in, {} dropped by the filter, {} near-duplicates, {} out ({} train / {} validation)",
        report.documents_in,
        f.documents_dropped,
        nd.documents_dropped,
        report.documents_out,
        out.train.len(),
        out.validation.len()
    );
    // The report is counts and settings: no name, no term, no text.
    let json = serde_json::to_string(&report).unwrap();
    assert!(!json.contains("Medicaid") && !json.contains("Larue") && !json.contains("Chief"));
    let counts: BTreeMap<String, usize> = report.redaction.spans.clone();
    assert!(counts["NAME"] > 0);
    // Commitment: same documents, same root; a different configuration digest and root when the
    // protected documents change.
    let salt = [3u8; 32];
    let root = commit_documents(&salt, &out);
    assert_eq!(
        root,
        commit_documents(&salt, &run(c.clone(), docs.clone()).0)
    );
    assert_eq!(root.rows as usize, report.documents_out);
    let mut c2 = c.clone();
    c2.near_duplicates.max_hamming = 0;
    let (out2, report2) = run(c2, docs);
    assert_ne!(report2.config_sha256, report.config_sha256);
    assert_ne!(commit_documents(&salt, &out2).root, root.root);
}

/// Attack (a new site engineer's export): one patient's id spelt with a trailing space, in
/// another case, or padded, by a second export tool. Were these three patients, the patient's
/// notes would be three privacy units (each clipped and sampled on its own: the patient's
/// contribution to the model up to three times what the guarantee allows) and could fall on
/// both sides of the split. The spellings are one unit: trimmed and compared case-insensitively
/// (merging two units only makes a unit larger, which the guarantee allows).
#[test]
fn one_patient_spelt_several_ways_is_one_privacy_unit() {
    let spellings = ["MRN-0042", " MRN-0042", "mrn-0042 ", "\tMrn-0042\n"];
    let mut docs = Vec::new();
    for (i, p) in spellings.iter().enumerate() {
        docs.push(TextDocument {
            line: i as u64 + 1,
            id: None,
            patient: Some(p.to_string()),
            date: None,
            text: format!("note {i} of the patient with the four spellings: cough and fever"),
        });
    }
    for k in 0..8 {
        docs.push(TextDocument {
            line: 100 + k,
            id: None,
            patient: Some(format!("MRN-{:04}", 100 + k)),
            date: None,
            text: format!("note of another patient number {k}: a broken wrist, cast applied"),
        });
    }
    let mut c = config();
    c.near_duplicates.enabled = false;
    c.validation_fraction = 0.3;
    for seed in 0..6 {
        c.split_seed = seed;
        let (out, report) = run(c.clone(), docs.clone());
        let units: HashSet<u32> = out
            .train
            .iter()
            .chain(&out.validation)
            .filter(|d| d.text.contains("four spellings"))
            .map(|d| d.unit)
            .collect();
        assert_eq!(units.len(), 1, "seed {seed}: one patient, units {units:?}");
        assert_eq!(report.split.train_units + report.split.validation_units, 9);
        let sides = [&out.train, &out.validation]
            .iter()
            .filter(|side| side.iter().any(|d| d.text.contains("four spellings")))
            .count();
        assert_eq!(sides, 1, "seed {seed}: the patient's notes on both sides");
    }
}
