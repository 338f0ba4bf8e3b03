//! The action cache in a real redis-server (started here).

use std::time::Duration;

use hearth_proto::reapi::ActionResult;
use hearth_storage::{ActionCache, Digest, RedisActionCache, StoreError};
use hearth_testkit::Redis;

#[tokio::test]
async fn results_are_shared_between_servers_renewed_on_read_and_bad_ones_dropped() {
    let redis = Redis::start();
    let a = RedisActionCache::connect(&redis.url, "t1:", Duration::from_secs(3))
        .await
        .unwrap();
    let b = RedisActionCache::connect(&redis.url, "t1:", Duration::from_secs(3))
        .await
        .unwrap();
    let other_prefix = RedisActionCache::connect(&redis.url, "t2:", Duration::from_secs(3))
        .await
        .unwrap();
    let action = Digest::of(b"an action");
    let result = ActionResult {
        exit_code: 3,
        stdout_raw: b"out".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.get(&action).await.unwrap(), None);
    a.put(&action, &result).await.unwrap();
    assert_eq!(b.get(&action).await.unwrap(), Some(result.clone()));
    assert_eq!(other_prefix.get(&action).await.unwrap(), None);

    // Read within the TTL, it stays; left alone, it expires.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            b.get(&action).await.unwrap().is_some(),
            "a hit renews the entry"
        );
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(b.get(&action).await.unwrap(), None);

    // Bytes that are not an ActionResult are a miss, and are removed.
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("t1:ac:{}-{}", action.hash_hex(), action.size());
    redis::cmd("SET")
        .arg(&key)
        .arg(b"\xff\xff\xff not protobuf")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(a.get(&action).await.unwrap(), None);
    let left: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, None);

    a.put(&action, &result).await.unwrap();
    a.remove(&action).await.unwrap();
    assert_eq!(b.get(&action).await.unwrap(), None);
}

#[tokio::test]
async fn a_redis_that_goes_away_is_an_error_not_a_miss_and_it_reconnects() {
    let redis = Redis::start();
    let port = redis.port;
    let ac = RedisActionCache::connect(&redis.url, "", Duration::from_secs(60))
        .await
        .unwrap();
    let action = Digest::of(b"x");
    drop(redis);
    let err = ac.get(&action).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend { .. }), "{err}");
    let _again = Redis::start_on(port);
    let mut ok = false;
    for _ in 0..50 {
        if ac.get(&action).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the cache reconnects to a Redis that is back");
}

#[tokio::test]
async fn blob_ownership_is_shared_per_tenant_and_a_lapsed_grant_hides_never_reveals() {
    use hearth_storage::{Ownership, RedisOwners};
    let redis = Redis::start();
    let a = RedisOwners::connect(&redis.url, "t1:", Duration::from_secs(2))
        .await
        .unwrap();
    let b = RedisOwners::connect(&redis.url, "t1:", Duration::from_secs(2))
        .await
        .unwrap();
    let (x, y) = (Digest::of(b"x"), Digest::of(b"y"));
    let empty = Digest::empty();
    a.grant("team-a", &[x]).await.unwrap();
    // Another replica sees team A's grant; team B does not get it.
    let (owned, hidden) = b.partition("team-a", &[x, y, empty]).await.unwrap();
    assert_eq!((owned, hidden), (vec![x, empty], vec![y]));
    assert!(!b.owns("team-b", &x).await.unwrap());
    assert!(
        b.owns("team-b", &empty).await.unwrap(),
        "everyone reads the empty blob"
    );
    // A grant lives its time to live.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!b.owns("team-a", &x).await.unwrap());
}
