//! The model registry's tables on both backends: versions per name, registration once per job,
//! stage moves applied whole or not at all, one production version per name.

use tutela_coordinator::store::{StageMoveRecord, StoreError};
use tutela_protocol::release::{MoveKind, Stage, VersionMove};

use super::store::{for_each_backend, open, spec};

fn digest(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn mv(version: u64, n: u8, from: Stage, to: Stage) -> VersionMove {
    VersionMove {
        version,
        model_digest: digest(n),
        from,
        to,
    }
}

fn record(move_no: u64, kind: MoveKind, moves: Vec<VersionMove>) -> StageMoveRecord {
    StageMoveRecord {
        name: "cancer".into(),
        move_no,
        kind,
        moves,
        reason: "because".into(),
        signers: vec!["spiffe://t/operator/op".into()],
        moved_at_ms: 1,
    }
}

#[tokio::test]
async fn versions_count_per_name_and_moves_are_compare_and_set() {
    for_each_backend("registry", async |db| {
        let store = open(db).await;
        let (text, spec, d) = spec();
        let mut jobs = Vec::new();
        for _ in 0..3 {
            jobs.push(store.create_job(&text, &spec, &d).await.unwrap());
        }
        let v1 = store
            .register_version("cancer", &digest(1), &jobs[0])
            .await
            .unwrap();
        let v2 = store
            .register_version("cancer", &digest(2), &jobs[1])
            .await
            .unwrap();
        let other = store
            .register_version("other", &digest(3), &jobs[2])
            .await
            .unwrap();
        assert_eq!(
            (v1.version, v2.version, other.version),
            (1, 2, 1),
            "[{}]",
            db.label
        );
        // A resumed job finds its version instead of taking the next one.
        let again = store
            .register_version("cancer", &digest(1), &jobs[0])
            .await
            .unwrap();
        assert_eq!(again, v1);
        // ... and cannot claim another model or name.
        assert!(
            store
                .register_version("cancer", &digest(9), &jobs[0])
                .await
                .is_err()
        );
        assert!(
            store
                .register_version("bad/name", &digest(9), &jobs[2])
                .await
                .is_err()
        );
        assert_eq!(store.model_names().await.unwrap(), ["cancer", "other"]);

        use Stage::*;
        store
            .apply_stage_move(&record(
                1,
                MoveKind::Promote,
                vec![mv(1, 1, Candidate, Canary)],
            ))
            .await
            .unwrap();
        store
            .apply_stage_move(&record(
                2,
                MoveKind::Promote,
                vec![mv(1, 1, Canary, Production)],
            ))
            .await
            .unwrap();
        store
            .apply_stage_move(&record(
                3,
                MoveKind::Promote,
                vec![mv(2, 2, Candidate, Canary)],
            ))
            .await
            .unwrap();
        // A move from a stage the version has left changes nothing, not even its other parts.
        let stale = record(
            4,
            MoveKind::Promote,
            vec![mv(2, 2, Canary, Production), mv(1, 1, Canary, Retired)],
        );
        let e = store.apply_stage_move(&stale).await.unwrap_err();
        assert!(
            matches!(e, StoreError::StageConflict { .. }),
            "[{}] {e}",
            db.label
        );
        let vs = store.versions("cancer").await.unwrap();
        assert_eq!(
            (vs[0].stage, vs[1].stage),
            (Production, Canary),
            "[{}]",
            db.label
        );
        assert_eq!(store.next_move_no("cancer").await.unwrap(), 4);
        // Into production, the old one retired in the same move (out of production first).
        store
            .apply_stage_move(&record(
                4,
                MoveKind::Promote,
                vec![mv(2, 2, Canary, Production), mv(1, 1, Production, Retired)],
            ))
            .await
            .unwrap();
        let vs = store.versions("cancer").await.unwrap();
        assert_eq!((vs[0].stage, vs[1].stage), (Retired, Production));
        assert_eq!(vs[0].left_production, Some(4));
        // Two production versions are refused by the schema itself.
        let two = record(5, MoveKind::Rollback, vec![mv(1, 1, Retired, Production)]);
        assert!(
            store.apply_stage_move(&two).await.is_err(),
            "[{}]",
            db.label
        );
        let moves = store.stage_moves("cancer").await.unwrap();
        assert_eq!(moves.len(), 4);
        assert_eq!(moves[3].moves.len(), 2);
        assert_eq!(moves[3].signers, ["spiffe://t/operator/op"]);
    })
    .await;
}
