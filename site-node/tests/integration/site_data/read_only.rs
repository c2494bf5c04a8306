//! Attacks on the PostgreSQL source's promise to read only, as a site engineer might configure
//! it by mistake: a query that writes (a second statement, a CTE, a function, a row lock, a
//! sequence, `COPY`), a role that may change the table, and a superuser that can write a server
//! file from a read-only transaction. Each is refused before any row is read, and the table and
//! the server's disk are as they were.

use super::*;

const COLUMNS: &str = "age, sex, ward, stage, smoker, admitted, hb, outcome";

async fn count_rows(url: &str) -> i64 {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM visits")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    let _ = connection.close().await;
    n
}

fn refused(site: &str, config: &DatasetConfig) -> String {
    match tokio::task::block_in_place(|| source::open(site, config)) {
        Ok(_) => panic!("{:?} was read", config.postgres.as_ref().map(|p| &p.query)),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_or_role_that_could_write_is_refused_and_nothing_changes() {
    let Ok(admin) = std::env::var("TUTELA_TEST_POSTGRES_URL") else {
        eprintln!("TUTELA_TEST_POSTGRES_URL is not set: the PostgreSQL source is not tested");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("clinic.schema.toml");
    std::fs::write(&schema_path, SCHEMA).unwrap();
    let password = dir.path().join("reader.password");
    std::fs::write(&password, "reader-secret\n").unwrap();
    let rows = visits(12, false);
    let db = TestDatabase::create(&admin, &rows).await;
    let db_admin = with_database(&admin, &db.name);
    let config = |url: String, query: &str, password: Option<&Path>| DatasetConfig {
        path: PathBuf::new(),
        postgres: Some(PostgresConfig {
            url,
            query: query.to_string(),
            password_env: None,
            password_file: password.map(Path::to_path_buf),
            timeout_secs: 60,
            max_rows: 10_000,
        }),
        ..file_config(Path::new(""), &schema_path)
    };
    let reader = |query: &str| config(db.config(query, &password).url, query, Some(&password));
    // The SELECT-only role reads.
    let ok = tokio::task::block_in_place(|| {
        source::open("clinic", &reader(&format!("SELECT {COLUMNS} FROM visits")))
    });
    assert!(ok.is_ok(), "{:?}", ok.err().map(|e| e.to_string()));

    // Writing queries, by the SELECT-only role: refused by the server or before they run.
    execute(
        &db_admin,
        &[
            "CREATE FUNCTION wipe() RETURNS bigint LANGUAGE sql AS \
             'WITH d AS (DELETE FROM visits RETURNING 1) SELECT count(*) FROM d'"
                .to_string(),
            format!("GRANT EXECUTE ON FUNCTION wipe() TO {}", db.role),
            format!("GRANT USAGE ON SEQUENCE visits_id_seq TO {}", db.role),
        ],
    )
    .await;
    for query in [
        format!("SELECT {COLUMNS} FROM visits; DELETE FROM visits"),
        format!("WITH gone AS (DELETE FROM visits RETURNING *) SELECT {COLUMNS} FROM gone"),
        format!("SELECT {COLUMNS} FROM visits WHERE wipe() >= 0"),
        format!("SELECT {COLUMNS} FROM visits FOR UPDATE"),
        format!("SELECT {COLUMNS}, nextval('visits_id_seq') FROM visits"),
        "TRUNCATE visits".to_string(),
        "COPY visits TO STDOUT".to_string(),
    ] {
        let e = refused("clinic", &reader(&query));
        assert!(e.starts_with("postgres:clinic"), "{query}: {e}");
        assert!(
            !e.contains("reader-secret") && !e.contains("127.0.0.1"),
            "{e}"
        );
    }
    assert_eq!(count_rows(&db_admin).await, 12, "a query deleted rows");

    // A role that may change the table: refused before the query runs, naming the table.
    execute(
        &db_admin,
        &[format!(
            "GRANT INSERT, UPDATE, DELETE ON visits TO {}",
            db.role
        )],
    )
    .await;
    let e = refused("clinic", &reader(&format!("SELECT {COLUMNS} FROM visits")));
    assert!(
        e.contains("may change table public.visits") && e.contains("only SELECT"),
        "{e}"
    );
    execute(
        &db_admin,
        &[format!(
            "REVOKE INSERT, UPDATE, DELETE ON visits FROM {}",
            db.role
        )],
    )
    .await;

    // A superuser writes a server file from a read-only transaction (`COPY ... TO 'file'`):
    // refused before the statement runs, and no file appears.
    let leak = std::env::temp_dir().join(format!(
        "tutela-attack-copy-{}-{}.csv",
        std::process::id(),
        db.name
    ));
    let copy = format!(
        "COPY (SELECT {COLUMNS} FROM visits) TO '{}'",
        leak.display()
    );
    let e = refused("clinic", &config(db_admin.clone(), &copy, None));
    assert!(e.contains("superuser"), "{e}");
    assert!(!leak.exists(), "the query wrote {}", leak.display());
    let e = refused(
        "clinic",
        &config(
            db_admin.clone(),
            &format!("SELECT {COLUMNS} FROM visits"),
            None,
        ),
    );
    assert!(e.contains("superuser"), "{e}");
    assert_eq!(count_rows(&db_admin).await, 12);
    db.drop().await;
}
