//! A first end-to-end check: inserted loads show up in "FreightKpiDaily".

mod common;

use std::time::Duration;

use common::{start_service, test_settings, wait_for_exact_kpis, TestDb};

#[tokio::test]
async fn inserted_loads_reach_kpi_table() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;

    client
        .batch_execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
               SELECT 1 + i % 3, 'DELIVERED', 100, 60, now(), now() - (i % 4) * interval '1 day'
               FROM generate_series(1, 50) AS i"#,
        )
        .await
        .unwrap();

    wait_for_exact_kpis(&client, Duration::from_secs(3)).await;
    let rows: i64 = client
        .query_one(r#"SELECT count(*) FROM "FreightKpiDaily""#, &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 12);
    service.stop().await;
}
