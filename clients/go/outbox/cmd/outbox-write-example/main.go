// Command outbox-write-example writes one event the way a service does: a domain
// change and its event in one transaction, with the W3C trace context of the request.
// The relay's end-to-end test (tests/binary.rs) runs it; it is also the shortest
// complete example of the package.
//
//	outbox-write-example DATABASE_URL SCHEMA AGGREGATE_ID TOPIC
//
// TRACEPARENT and TRACESTATE in the environment stand for the request's trace context.
package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"time"

	_ "github.com/lib/pq"

	"outbox-relay/clients/go/outbox"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: outbox-write-example DATABASE_URL SCHEMA AGGREGATE_ID TOPIC")
		os.Exit(64)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3], os.Args[4]); err != nil {
		fmt.Fprintln(os.Stderr, "outbox-write-example:", err)
		os.Exit(1)
	}
}

func run(url, schema, id, topic string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db, err := sql.Open("postgres", url)
	if err != nil {
		return err
	}
	defer db.Close()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback() // a no-op after Commit
	// The service's own change would go here, in tx.
	err = outbox.Write(ctx, tx, outbox.Event{
		AggregateType:    "order",
		AggregateID:      id,
		EventType:        "OrderPlaced",
		Payload:          map[string]int{"total": 5},
		Topic:            topic,
		Headers:          map[string]string{"tenant": "acme"},
		CorrelationID:    "corr-" + id,
		IdempotencyToken: "order-" + id + "-placed",
	}, outbox.WithSchema(schema), outbox.WithTraceContext(func(context.Context) (string, string) {
		return os.Getenv("TRACEPARENT"), os.Getenv("TRACESTATE")
	}))
	if err != nil {
		return fmt.Errorf("order %s: %w", id, err)
	}
	return tx.Commit()
}
