//! The job spec's tests: the signed messages, every documented range, the language-model keys, the tokenizer digest.

mod signed_message_tests {
    use crate::job::*;

    const JOB: &str = "0123456789abcdef0123456789abcdef";
    const DIGEST: &str = "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5";

    #[test]
    fn approval_and_rejection_messages_are_domain_separated() {
        assert!(!APPROVAL_CONTEXT.starts_with(REJECTION_CONTEXT));
        assert!(!REJECTION_CONTEXT.starts_with(APPROVAL_CONTEXT));
        let approval = approval_message(JOB, DIGEST, 1_700_000_000_000, 1_700_000_060_000);
        let rejection = rejection_message(JOB, DIGEST, "no", 1_700_000_000_000);
        assert!(approval.starts_with(format!("{APPROVAL_CONTEXT}\n").as_bytes()));
        assert!(rejection.starts_with(format!("{REJECTION_CONTEXT}\n").as_bytes()));
        assert_ne!(approval, rejection);
    }

    #[test]
    fn the_rejection_message_binds_every_field() {
        let base = rejection_message(JOB, DIGEST, "too much ε", 1);
        assert_eq!(
            String::from_utf8(base.clone()).unwrap(),
            format!(
                "tutela/job-rejection/v1\njob={JOB}\nspec-digest={DIGEST}\nsigned-at-ms=1\nreason-bytes=11\nreason=too much ε\n"
            )
        );
        assert_ne!(base, rejection_message("other", DIGEST, "too much ε", 1));
        assert_ne!(
            base,
            rejection_message(JOB, &"b".repeat(64), "too much ε", 1)
        );
        assert_ne!(base, rejection_message(JOB, DIGEST, "too much δ", 1));
        assert_ne!(base, rejection_message(JOB, DIGEST, "too much ε", 2));
        // A reason that imitates the tail of another message still differs by its length.
        assert_ne!(
            rejection_message(JOB, DIGEST, "a\nreason-bytes=1\nreason=b", 1),
            rejection_message(JOB, DIGEST, "a", 1)
        );
    }

    #[test]
    fn rejection_reasons_are_checked() {
        assert_eq!(rejection_reason_problem("the DP budget is too high"), None);
        assert_eq!(rejection_reason_problem("line one\n\tline two"), None);
        assert!(rejection_reason_problem("").unwrap().contains("empty"));
        assert!(rejection_reason_problem(" \n ").unwrap().contains("empty"));
        assert!(
            rejection_reason_problem(&"x".repeat(MAX_REJECTION_REASON_BYTES + 1))
                .unwrap()
                .contains("over the limit")
        );
        assert!(
            rejection_reason_problem("ok\u{1b}[2J")
                .unwrap()
                .contains("U+001B")
        );
    }
}

mod documented_range_tests {
    use crate::job::*;

    /// Sets `key` (dotted) of `table` to `value`.
    fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap();
        let mut t = table;
        for p in parts {
            t = t
                .entry(p)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap();
        }
        t.insert(last.to_string(), value);
    }

    /// Every range deploy/jobs/*.toml documents, one value just outside it each: the shipped
    /// file with that one change is refused, naming the key.
    #[test]
    fn every_documented_job_spec_range_is_enforced() {
        use toml::Value::{Array, Float, Integer};
        for shipped in [
            include_str!("../../../deploy/jobs/breast_cancer_fedavg.toml"),
            include_str!("../../../deploy/jobs/mnist_cnn_fedavg.toml"),
        ] {
            JobSpec::from_toml_str(shipped).expect("the shipped job spec is valid");
            let cases: Vec<(&str, toml::Value)> = vec![
                ("rounds", Integer(0)),
                ("min_sites", Integer(0)),
                ("fraction", Float(0.0)),
                ("fraction", Float(1.5)),
                ("round_deadline_secs", Integer(0)),
                ("update_norm_bound", Float(0.0)),
                ("update_norm_bound", Float(f64::INFINITY)),
                ("model.dropout", Float(1.0)),
                ("model.dropout", Float(-0.1)),
                ("model.hidden", Array(vec![Integer(0)])),
                ("training.learning_rate", Float(0.0)),
                ("training.local_epochs", Integer(0)),
                ("training.batch_size", Integer(0)),
                ("training.weight_decay", Float(-1e-4)),
                ("training.momentum", Float(1.0)),
                ("privacy.target_epsilon", Float(0.0)),
                ("privacy.delta", Float(1.0)),
                ("privacy.delta", Float(0.0)),
                ("privacy.max_grad_norm", Float(0.0)),
            ];
            for (key, value) in cases {
                let mut table: toml::Table = toml::from_str(shipped).unwrap();
                set(&mut table, key, value.clone());
                let text = toml::to_string(&table).unwrap();
                let err = JobSpec::from_toml_str(&text)
                    .expect_err(&format!("{key} = {value} must be refused"));
                assert_eq!(err.key(), Some(key), "{key} = {value}: {err}");
            }
        }
    }
}

mod language_model_keys_tests {
    use crate::job::*;

    const SPEC: &str = r#"
name = "notes-lora"
rounds = 1
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 1.0
[model]
name = "llama"
[data]
schema = "notes"
[training]
optimizer = "adam"
learning_rate = 0.001
local_epochs = 1
batch_size = 8
[privacy]
mode = "local"
target_epsilon = 8.0
max_grad_norm = 1.0
"#;

    #[test]
    fn the_privacy_unit_is_read_defaults_to_document_and_is_inside_the_digest() {
        let plain = JobSpec::from_toml_str(SPEC).unwrap();
        assert_eq!(plain.privacy.as_ref().unwrap().unit, PrivacyUnit::Document);
        let explicit = SPEC.replace(
            "max_grad_norm = 1.0",
            "max_grad_norm = 1.0\nunit = \"document\"",
        );
        // The default, written or not, is the same spec with the same digest.
        assert_eq!(
            JobSpec::from_toml_str(&explicit).unwrap().digest(),
            plain.digest()
        );
        let patient = SPEC.replace(
            "max_grad_norm = 1.0",
            "max_grad_norm = 1.0\nunit = \"patient\"",
        );
        let patient = JobSpec::from_toml_str(&patient).unwrap();
        assert_eq!(patient.privacy.as_ref().unwrap().unit, PrivacyUnit::Patient);
        assert_ne!(patient.digest(), plain.digest());
        assert!(
            JobSpec::from_toml_str(&SPEC.replace(
                "max_grad_norm = 1.0",
                "max_grad_norm = 1.0\nunit = \"ward\""
            ))
            .is_err()
        );
        // A patient unit means nothing without DP-SGD at the sites.
        let central = SPEC.replace(
            "mode = \"local\"\ntarget_epsilon = 8.0\nmax_grad_norm = 1.0",
            "mode = \"central\"\ntarget_epsilon = 8.0\nunit = \"patient\"\n[privacy.central]\nclip_norm = 1.0",
        );
        let err = JobSpec::from_toml_str(&central).unwrap_err();
        assert_eq!(err.key(), Some("privacy.unit"), "{err}");
    }

    #[test]
    fn the_metrics_keys_are_checked_and_inside_the_digest() {
        let plain = JobSpec::from_toml_str(SPEC).unwrap();
        let p = plain.privacy.as_ref().unwrap();
        assert_eq!(
            (
                p.metrics_noise_multiplier,
                p.metrics_epsilon_share,
                p.metrics_loss_max
            ),
            (None, None, None)
        );
        let with = |keys: &str| {
            SPEC.replace(
                "max_grad_norm = 1.0",
                &format!("max_grad_norm = 1.0\n{keys}"),
            )
        };
        for keys in [
            "metrics_noise_multiplier = 25.0",
            "metrics_epsilon_share = 0.2",
            "metrics_loss_max = 8.0",
        ] {
            let spec = JobSpec::from_toml_str(&with(keys)).unwrap();
            assert_ne!(spec.digest(), plain.digest(), "{keys}");
        }
        for (keys, key) in [
            (
                "metrics_noise_multiplier = 0.5",
                "privacy.metrics_noise_multiplier",
            ),
            (
                "metrics_epsilon_share = 1.0",
                "privacy.metrics_epsilon_share",
            ),
            ("metrics_loss_max = -1.0", "privacy.metrics_loss_max"),
            ("metrics_epsilon = 0.1", ""),
        ] {
            let err = JobSpec::from_toml_str(&with(keys)).unwrap_err();
            if !key.is_empty() {
                assert_eq!(err.key(), Some(key), "{err}");
            }
        }
    }

    #[test]
    fn max_seq_len_is_checked_and_inside_the_digest() {
        let plain = JobSpec::from_toml_str(SPEC).unwrap();
        assert_eq!(plain.training.max_seq_len, None);
        let with = |n: u32| {
            SPEC.replace(
                "batch_size = 8",
                &format!("batch_size = 8\nmax_seq_len = {n}"),
            )
        };
        let spec = JobSpec::from_toml_str(&with(128)).unwrap();
        assert_eq!(spec.training.max_seq_len, Some(128));
        assert_ne!(spec.digest(), plain.digest());
        for bad in [0, 1, MAX_SEQ_LEN + 1] {
            let err = JobSpec::from_toml_str(&with(bad)).unwrap_err();
            assert_eq!(err.key(), Some("training.max_seq_len"), "{bad}: {err}");
        }
    }
}

mod tokenizer_digest_tests {
    use crate::job::*;

    const SPEC: &str = r#"
name = "notes-lm"
rounds = 1
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 1.0
[model]
name = "llama"
hidden_size = 64
[data]
schema = "notes"
[training]
optimizer = "adam"
learning_rate = 0.001
local_epochs = 1
batch_size = 8
"#;

    const A: &str = "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5";
    const B: &str = "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a6";

    fn with_tokenizer(digest: &str) -> String {
        SPEC.replace(
            "name = \"llama\"",
            &format!("name = \"llama\"\ntokenizer_sha256 = \"{digest}\""),
        )
    }

    #[test]
    fn the_tokenizer_digest_is_read_and_is_not_a_hyper_parameter() {
        let spec = JobSpec::from_toml_str(&with_tokenizer(A)).unwrap();
        assert_eq!(spec.model.tokenizer_sha256.as_deref(), Some(A));
        assert!(!spec.model.params.contains_key("tokenizer_sha256"));
        assert_eq!(spec.model.params["hidden_size"], toml::Value::Integer(64));
        let plain = JobSpec::from_toml_str(SPEC).unwrap();
        assert_eq!(plain.model.tokenizer_sha256, None);
        // Absent, it is not in the canonical JSON: jobs without a tokenizer keep their digest.
        assert!(!plain.canonical_json().contains("tokenizer_sha256"));
        assert!(
            spec.canonical_json()
                .contains(&format!("\"tokenizer_sha256\":\"{A}\""))
        );
    }

    #[test]
    fn the_job_digest_changes_with_the_tokenizer_digest() {
        let none = JobSpec::from_toml_str(SPEC).unwrap().digest();
        let a = JobSpec::from_toml_str(&with_tokenizer(A)).unwrap().digest();
        let b = JobSpec::from_toml_str(&with_tokenizer(B)).unwrap().digest();
        assert_ne!(a, b);
        assert_ne!(a, none);
        assert_ne!(b, none);
        // The same tokenizer in a reformatted spec: the same digest.
        let commented =
            with_tokenizer(A).replace("hidden_size = 64", "hidden_size = 64 # the width");
        assert_eq!(JobSpec::from_toml_str(&commented).unwrap().digest(), a);
    }

    #[test]
    fn a_tokenizer_digest_must_be_64_lowercase_hex_digits() {
        for bad in [
            &A[..63],
            &A.to_uppercase(),
            &format!("{}g", &A[..63]),
            "",
            "sha256:abc",
        ] {
            let e = JobSpec::from_toml_str(&with_tokenizer(bad)).unwrap_err();
            assert_eq!(e.key(), Some("model.tokenizer_sha256"), "{bad:?}: {e}");
            assert!(e.to_string().contains("64 lowercase hex digits"), "{e}");
        }
        let not_a_string = SPEC.replace(
            "name = \"llama\"",
            "name = \"llama\"\ntokenizer_sha256 = 42",
        );
        assert!(JobSpec::from_toml_str(&not_a_string).is_err());
    }

    #[test]
    fn the_base_model_digest_is_signed_and_checked_like_the_tokenizer_s() {
        let with_base = |digest: &str| {
            SPEC.replace(
                "name = \"llama\"",
                &format!("name = \"llama\"\nbase_sha256 = \"{digest}\""),
            )
        };
        let spec = JobSpec::from_toml_str(&with_base(A)).unwrap();
        assert_eq!(spec.model.base_sha256.as_deref(), Some(A));
        assert!(!spec.model.params.contains_key("base_sha256"));
        let plain = JobSpec::from_toml_str(SPEC).unwrap();
        assert!(!plain.canonical_json().contains("base_sha256"));
        let b = JobSpec::from_toml_str(&with_base(B)).unwrap();
        assert_ne!(spec.digest(), b.digest());
        assert_ne!(spec.digest(), plain.digest());
        let e = JobSpec::from_toml_str(&with_base(&A[..63])).unwrap_err();
        assert_eq!(e.key(), Some("model.base_sha256"), "{e}");
    }

    /// `[data] schema_sha256` is inside the signed digest when given, absent from the canonical
    /// JSON when not (old jobs keep their digest), and must be a digest.
    #[test]
    fn the_schema_digest_is_signed_and_optional() {
        let with = |d: &str| {
            SPEC.replace(
                "schema = \"notes\"",
                &format!("schema = \"notes\"\nschema_sha256 = \"{d}\""),
            )
        };
        assert!(
            with(A).contains("schema_sha256"),
            "the fixture has a [data] schema line"
        );
        let plain = JobSpec::from_toml_str(SPEC).unwrap();
        assert_eq!(plain.data.schema_sha256, None);
        assert!(!plain.canonical_json().contains("schema_sha256"));
        let a = JobSpec::from_toml_str(&with(A)).unwrap();
        let b = JobSpec::from_toml_str(&with(B)).unwrap();
        assert_eq!(a.data.schema_sha256.as_deref(), Some(A));
        assert_ne!(a.digest(), b.digest());
        assert_ne!(a.digest(), plain.digest());
        let err = JobSpec::from_toml_str(&with("ABC"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.schema_sha256"), "{err}");
    }
}

mod watermark_section_tests {
    use crate::job::*;

    const SHIPPED: &str = include_str!("../../../deploy/jobs/breast_cancer_fedavg.toml");

    fn with(section: &str) -> String {
        format!("{SHIPPED}\n[watermark]\n{section}\n")
    }

    #[test]
    fn the_watermark_section_is_strict_defaulted_and_inside_the_digest() {
        let plain = JobSpec::from_toml_str(SHIPPED).unwrap();
        assert!(plain.watermark.is_none());
        let marked = JobSpec::from_toml_str(&with("")).unwrap();
        let w = marked.watermark.clone().unwrap();
        assert_eq!(w.scheme, WatermarkScheme::SpreadSpectrumV1);
        assert_eq!((w.target_z, w.max_amplitude), (12.0, None));
        assert_eq!(w.strength(false), crate::watermark::DEFAULT_STRENGTH);
        assert_eq!(w.strength(true), crate::watermark::LORA_DEFAULT_STRENGTH);
        assert_ne!(plain.digest(), marked.digest());
        // Spelling the defaults out is the same spec.
        let explicit =
            JobSpec::from_toml_str(&with("scheme = \"spread_spectrum_v1\"\ntarget_z = 12.0"))
                .unwrap();
        assert_eq!(explicit.digest(), marked.digest());
        let stronger = JobSpec::from_toml_str(&with("target_z = 20.0")).unwrap();
        assert_ne!(stronger.digest(), marked.digest());

        // A misspelt key, an unknown scheme, and values out of range are refused by name.
        let err = JobSpec::from_toml_str(&with("target = 20.0")).unwrap_err();
        assert!(err.to_string().contains("target"), "{err}");
        let err = JobSpec::from_toml_str(&with("scheme = \"lsb\"")).unwrap_err();
        assert!(err.to_string().contains("lsb"), "{err}");
        for (key, value) in [
            ("watermark.target_z", "6.0"),
            ("watermark.target_z", "nan"),
            ("watermark.max_amplitude", "0.0"),
            ("watermark.max_amplitude", "0.6"),
        ] {
            let short = key.trim_start_matches("watermark.");
            let err = JobSpec::from_toml_str(&with(&format!("{short} = {value}"))).unwrap_err();
            assert_eq!(err.key(), Some(key), "{short} = {value}: {err}");
        }
    }
}

mod publish_tests {
    use crate::job::*;

    const SHIPPED: &str = include_str!("../../../deploy/jobs/breast_cancer_fedavg.toml");

    #[test]
    fn the_registry_name_is_the_publish_name_or_the_job_s_and_is_inside_the_digest() {
        let plain = JobSpec::from_toml_str(SHIPPED).unwrap();
        assert_eq!(plain.publish, None);
        assert_eq!(plain.registry_name(), plain.name);
        let with = |name: &str| format!("{SHIPPED}\n[publish]\nname = \"{name}\"\n");
        let named = JobSpec::from_toml_str(&with("cancer-screening")).unwrap();
        assert_eq!(named.registry_name(), "cancer-screening");
        assert_ne!(named.digest(), plain.digest());
        assert_ne!(
            named.digest(),
            JobSpec::from_toml_str(&with("cancer-screening-2"))
                .unwrap()
                .digest()
        );
        for bad in ["", "-x", "a/b", &"x".repeat(65)] {
            let err = JobSpec::from_toml_str(&with(bad)).unwrap_err();
            assert_eq!(err.key(), Some("publish.name"), "{bad:?}: {err}");
        }
        // Strict: a misspelt key is an error, not a silently ignored setting.
        let err =
            JobSpec::from_toml_str(&format!("{SHIPPED}\n[publish]\nnmae = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
    }
}
