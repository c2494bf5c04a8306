//! The job-spec parser under fuzzing: TOML → [`JobSpec`] → [`SpecDigest`](crate::job::SpecDigest).
//!
//! Properties checked, beyond "no panic, no hang, memory bounded by the input": for a spec that
//! parses and validates,
//! - its digest is a function of the spec (computed twice, equal);
//! - the digest is stable under re-serialization, as `protocol::job` claims ("reformatting ...
//!   leaves it unchanged"): the spec written back as TOML (compact and pretty, as `tutela demo`
//!   writes the specs it submits) parses and validates again, to an equal spec with the same digest.

use crate::job::JobSpec;

/// Parses `data` as a job spec's TOML.
pub fn spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = JobSpec::from_toml_str(text) else {
        return;
    };
    let digest = spec.digest();
    assert_eq!(
        spec.digest(),
        digest,
        "a spec's digest changed between two calls"
    );
    for (style, written) in [
        ("compact", toml::to_string(&spec)),
        ("pretty", toml::to_string_pretty(&spec)),
    ] {
        let written = match written {
            Ok(w) => w,
            Err(e) => panic!("a valid spec cannot be written back as TOML ({style}): {e}"),
        };
        let again = match JobSpec::from_toml_str(&written) {
            Ok(s) => s,
            Err(e) => {
                panic!("a valid spec written back as TOML ({style}) is refused: {e}\n{written}")
            }
        };
        assert_eq!(
            again.digest(),
            digest,
            "a spec written back as TOML ({style}) has another digest:\n{written}"
        );
        assert!(
            again == spec,
            "a spec written back as TOML ({style}) parses to another spec:\n{written}"
        );
    }
}
