#!/usr/bin/env bash
# Fetches Apache Kafka (broker + tools) jars from Maven Central at the version
# pinned in env/versions.env, into $CACHE/kafka-<version>/libs. Cached by version.
. "$(dirname "$0")/lib.sh"

[[ -f $KAFKA_LIBS/.complete ]] && exit 0
command -v mvn >/dev/null || die "mvn (Apache Maven) is required to fetch Kafka from Maven Central"
command -v java >/dev/null || die "java (17 or newer) is required to run Kafka"
work="$CACHE/kafka-$KAFKA_VERSION/pom"
mkdir -p "$work" "$KAFKA_LIBS"
log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central"
cat > "$work/pom.xml" <<POM
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.streamscore</groupId>
  <artifactId>local-kafka</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_$KAFKA_SCALA_VERSION</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>$SLF4J_RELOAD4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime
touch "$KAFKA_LIBS/.complete"
log "Kafka jars: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) in $KAFKA_LIBS"
