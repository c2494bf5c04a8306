//! `tutela-node keys rotate`: the real binary re-wraps the node's files under a new key-encryption
//! key without re-encrypting them, and the old key no longer opens them.

use std::process::Command;

use tutela_privacy::at_rest::{EncryptOptions, LocalKek, decrypt_to_vec, encrypt_bytes};

#[test]
fn keys_rotate_rewraps_every_file_of_the_work_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("work");
    std::fs::create_dir_all(work.join("models")).unwrap();
    let old = LocalKek::generate_key_file(&d.join("old.kek")).unwrap();
    let new_path = d.join("new.kek");
    let new = LocalKek::generate_key_file(&new_path).unwrap();
    let files: Vec<_> = (0..3)
        .map(|i| {
            let p = work.join("models").join(format!("m{i}.safetensors.enc"));
            encrypt_bytes(
                format!("model {i}").repeat(1000).as_bytes(),
                &p,
                &old,
                EncryptOptions::default(),
            )
            .unwrap();
            p
        })
        .collect();
    let schema = d.join("s.toml");
    std::fs::write(&schema, "").unwrap();
    let config = d.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "site = \"a\"\ncoordinator = \"localhost:1\"\nwork_dir = \"{}\"\nsite_policy = \"site-policy.toml\"\n[tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n[at_rest]\nkek_file = \"{}\"\n[datasets.x]\ncsv = \"x.csv\"\nschema = \"s.toml\"\n",
            work.display(),
            d.join("old.kek").display()
        ),
    )
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args(["keys", "rotate", "--config"])
        .arg(&config)
        .arg("--new-kek-file")
        .arg(&new_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 file(s) re-wrapped"), "{stdout}");
    for (i, f) in files.iter().enumerate() {
        assert_eq!(
            decrypt_to_vec(f, &new).unwrap(),
            format!("model {i}").repeat(1000).into_bytes()
        );
        assert!(
            decrypt_to_vec(f, &old).is_err(),
            "the old key still opens {}",
            f.display()
        );
    }

    // A second run finds nothing left to do under a config that still names the old key.
    let again = Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args(["keys", "rotate", "--config"])
        .arg(&config)
        .arg("--new-kek-file")
        .arg(&new_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("3 already under the new key"), "{stdout}");
}
