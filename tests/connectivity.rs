//! Broker connectivity: an outage of the Kafka cluster is visible in `/status`, the metrics and
//! one log line per change, and the sidecar recovers by itself when the brokers come back.
//! Runs against a broker the test owns (common::kafka_server), so it can stop it.

mod common;

use common::kafka_server::TestKafka;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_broker_keeps_its_topics_and_offsets_across_a_restart() {
    let mut kafka = TestKafka::start();
    let topic = unique("kafka-server");
    create_topic_on(&kafka.bootstrap(), &topic, 2).await;
    produce_to(&kafka.bootstrap(), &topic, (0..10).map(|i| Out::keyed(format!("k{i}"), "v")).collect()).await;
    let before = end_offsets_on(&kafka.bootstrap(), &topic, 2);
    assert_eq!(before.iter().sum::<i64>(), 10);

    kafka.stop();
    assert!(!kafka.is_running());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", kafka.port)).is_err(),
        "the port still answers after stop"
    );
    kafka.restart();
    assert_eq!(end_offsets_on(&kafka.bootstrap(), &topic, 2), before, "data lost across the restart");
    produce_to(&kafka.bootstrap(), &topic, vec![Out::keyed("k", "after")]).await;
    let after = end_offsets_on(&kafka.bootstrap(), &topic, 2);
    assert_eq!(after.iter().sum::<i64>(), 11, "cannot produce after the restart");
}
