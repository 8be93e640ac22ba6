package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pullsecret/pullsecret/audit"
)

// Defaults of AuditLog.
const (
	DefaultAuditQueueSize = 8192
	// auditBatch bounds one COPY.
	auditBatch = 512
	// auditCloseTimeout bounds the last writes of Close.
	auditCloseTimeout = 10 * time.Second
	// auditWriteTimeout bounds one attempt at writing a batch.
	auditWriteTimeout = 10 * time.Second
)

// auditRetries are the pauses before the second and third attempts of a
// batch: a failover or a restart of the database loses no events, a long
// outage loses them rather than blocking requests for long.
var auditRetries = []time.Duration{200 * time.Millisecond, time.Second}

// AuditLog is an audit.Log in the table audit_events: the event as JSON
// (every field, including those added later) and the columns queries
// filter on. As with the file, Record queues and one goroutine writes, in
// batches (COPY), so a request never waits for the database; Query first
// writes what this process queued. Times are kept to the microsecond.
type AuditLog struct {
	db        *DB
	queueSize int
	q         *audit.Queue
	// ctx is the writer's; Close cancels it when the last writes take
	// longer than auditCloseTimeout.
	ctx    context.Context
	cancel context.CancelFunc
}

var _ audit.Log = (*AuditLog)(nil)

// AuditOption configures OpenAuditLog.
type AuditOption func(*AuditLog)

// WithAuditQueueSize sets how many events may wait for the writer
// (default DefaultAuditQueueSize). When it is full, Record waits for room
// until its context ends.
func WithAuditQueueSize(n int) AuditOption {
	return func(a *AuditLog) {
		if n > 0 {
			a.queueSize = n
		}
	}
}

// OpenAuditLog starts the audit trail's writer. Close it to write what is
// queued.
func (db *DB) OpenAuditLog(opts ...AuditOption) *AuditLog {
	a := &AuditLog{db: db, queueSize: DefaultAuditQueueSize}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	for _, o := range opts {
		o(a)
	}
	a.q = audit.NewQueue(a.queueSize, auditBatch, a.writeBatch)
	return a
}

// Record implements audit.Log: it queues e, waiting only when the queue is
// full, and then no longer than ctx allows.
func (a *AuditLog) Record(ctx context.Context, e audit.Event) error {
	if e.Time.IsZero() {
		e.Time = a.db.now()
	}
	e.Time = e.Time.UTC().Truncate(time.Microsecond)
	return a.q.Send(ctx, e)
}

// Flush waits until every event recorded before it is written, and
// reports the first write failure since the previous Flush.
func (a *AuditLog) Flush(ctx context.Context) error { return a.q.Flush(ctx) }

// Query implements audit.Log: the events this process recorded are
// written first, then the table is read (oldest first; with a Limit, the
// most recent ones).
func (a *AuditLog) Query(ctx context.Context, f audit.Filter) ([]audit.Event, error) {
	if err := a.Flush(ctx); err != nil && !errors.Is(err, audit.ErrClosed) {
		return nil, err
	}
	var (
		where []string
		args  []any
	)
	arg := func(v any) string {
		args = append(args, v)
		return fmt.Sprintf("$%d", len(args))
	}
	if f.Project != "" {
		where = append(where, "project = "+arg(f.Project))
	}
	if !f.Since.IsZero() {
		// Stored times are whole microseconds: the first one at or after
		// Since is Since rounded up.
		since := f.Since.Truncate(time.Microsecond)
		if since.Before(f.Since) {
			since = since.Add(time.Microsecond)
		}
		where = append(where, "time >= "+arg(since))
	}
	if f.Denied {
		where = append(where, "decision = "+arg(string(audit.Denied)))
	}
	q := "SELECT event FROM audit_events"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	if f.Limit > 0 {
		q += " ORDER BY time DESC, id DESC LIMIT " + arg(f.Limit)
	} else {
		q += " ORDER BY time, id"
	}
	rows, _ := a.db.pool.Query(ctx, q, args...)
	events, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (audit.Event, error) {
		var raw []byte
		if err := r.Scan(&raw); err != nil {
			return audit.Event{}, err
		}
		var e audit.Event
		if err := json.Unmarshal(raw, &e); err != nil {
			return audit.Event{}, errors.New("an audit_events row is not an event")
		}
		return e, nil
	})
	if err != nil {
		return nil, a.db.wrap("query audit events", err)
	}
	if f.Limit > 0 {
		slices.Reverse(events)
	}
	return events, nil
}

// Close writes everything queued (giving up after 10s, when the database
// does not answer) and stops the writer. Records after Close fail with
// audit.ErrClosed.
func (a *AuditLog) Close() error {
	t := time.AfterFunc(auditCloseTimeout, a.cancel)
	a.q.Close()
	t.Stop()
	a.cancel()
	return nil
}

// writeBatch is the queue's writer: one COPY per batch.
func (a *AuditLog) writeBatch(batch []audit.Event) error {
	err := a.write(a.ctx, batch)
	if err != nil {
		a.db.log.Error("audit: write to the database failed; events lost", "events", len(batch), "err", err)
	}
	return err
}

// write copies batch into the table, trying again after a pause or two.
func (a *AuditLog) write(ctx context.Context, batch []audit.Event) error {
	rows := make([][]any, len(batch))
	for i, e := range batch {
		b, err := json.Marshal(e)
		if err != nil { // cannot happen: an Event holds strings, a time and ints
			return err
		}
		rows[i] = []any{e.Time, e.Project, string(e.Decision), b}
	}
	var err error
	for attempt := 0; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, auditWriteTimeout)
		_, err = a.db.pool.CopyFrom(actx, pgx.Identifier{"audit_events"},
			[]string{"time", "project", "decision", "event"}, pgx.CopyFromRows(rows))
		cancel()
		if err == nil || attempt == len(auditRetries) || ctx.Err() != nil {
			break
		}
		select {
		case <-time.After(auditRetries[attempt]):
		case <-ctx.Done():
		}
	}
	return a.db.wrap("write audit events", err)
}
