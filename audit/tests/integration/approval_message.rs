//! The approval message the audit service verifies is exactly the one the policy crate signs.

use tutela_audit::approval::policy_signed_message;
use tutela_protocol::job::SpecDigest;

#[test]
fn the_approval_message_is_the_policy_crates() {
    let digest = SpecDigest([0xa5; 32]);
    assert_eq!(
        policy_signed_message(
            "job-7",
            &digest.to_hex(),
            1_700_000_000_000,
            1_700_086_400_000
        ),
        tutela_policy::approval::signed_message(
            "job-7",
            &digest,
            1_700_000_000_000,
            1_700_086_400_000
        )
    );
}
