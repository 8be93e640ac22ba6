package postgres

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/internal/pgtest"
)

// flushLog is an audit.Log whose queue can be written out on demand: both
// audit.File and AuditLog are.
type flushLog interface {
	audit.Log
	Flush(ctx context.Context) error
	Close() error
}

// openAudit returns n handles on one new, empty audit trail, as n
// replicas each open it.
type openAudit func(t *testing.T, n int) []flushLog

// TestAuditLogContract: the audit table answers queries as the embedded
// file does; both run the one suite.
func TestAuditLogContract(t *testing.T) {
	t.Parallel()
	t.Run("file", func(t *testing.T) {
		t.Parallel()
		testAuditLog(t, func(t *testing.T, n int) []flushLog {
			path := filepath.Join(t.TempDir(), audit.FileName)
			out := make([]flushLog, n)
			for i := range out {
				f, err := audit.OpenFile(path)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { f.Close() })
				out[i] = f
			}
			return out
		})
	})
	t.Run("postgres", func(t *testing.T) {
		t.Parallel()
		testAuditLog(t, func(t *testing.T, n int) []flushLog {
			out := make([]flushLog, n)
			for i, db := range handles(t, n) {
				a := db.OpenAuditLog()
				t.Cleanup(func() { a.Close() })
				out[i] = a
			}
			return out
		})
	})
}

func testAuditLog(t *testing.T, open openAudit) {
	t.Run("QueryFilters", func(t *testing.T) { t.Parallel(); testAuditQuery(t, open) })
	t.Run("EveryField", func(t *testing.T) { t.Parallel(); testAuditFields(t, open) })
	t.Run("Concurrent", func(t *testing.T) { t.Parallel(); testAuditConcurrent(t, open) })
	t.Run("Closed", func(t *testing.T) { t.Parallel(); testAuditClosed(t, open) })
}

func flush(t *testing.T, logs ...flushLog) {
	t.Helper()
	for _, l := range logs {
		if err := l.Flush(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

func query(t *testing.T, l audit.Log, f audit.Filter) []string {
	t.Helper()
	events, err := l.Query(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range events {
		out = append(out, e.Reference)
	}
	return out
}

func testAuditQuery(t *testing.T, open openAudit) {
	ctx := context.Background()
	h := open(t, 2)
	base := time.Now().UTC().Truncate(time.Second).Add(-time.Hour)
	// Recorded out of time order, by two replicas.
	for i, e := range []struct {
		ref, project string
		at           time.Duration
		denied       bool
	}{
		{"e3", "acme", 3 * time.Minute, false},
		{"e1", "acme", 1 * time.Minute, true},
		{"e2", "beta", 2 * time.Minute, false},
		{"e5", "beta", 5 * time.Minute, true},
		{"e4", "acme", 4 * time.Minute, false},
	} {
		ev := audit.Event{Time: base.Add(e.at), Project: e.project, Action: audit.ActionPull, Via: audit.ViaProxy,
			Reference: e.ref, Decision: audit.Allowed}
		if e.denied {
			ev.Decision, ev.Reason = audit.Denied, "token revoked"
		}
		if err := h[i%2].Record(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, h...)
	for _, tc := range []struct {
		name string
		f    audit.Filter
		want []string
	}{
		{"all", audit.Filter{}, []string{"e1", "e2", "e3", "e4", "e5"}},
		{"project", audit.Filter{Project: "acme"}, []string{"e1", "e3", "e4"}},
		{"since", audit.Filter{Since: base.Add(3 * time.Minute)}, []string{"e3", "e4", "e5"}},
		{"since, to the nanosecond", audit.Filter{Since: base.Add(3*time.Minute + 1)}, []string{"e4", "e5"}},
		{"denied", audit.Filter{Denied: true}, []string{"e1", "e5"}},
		{"limit: the most recent, oldest first", audit.Filter{Limit: 2}, []string{"e4", "e5"}},
		{"all of them", audit.Filter{Project: "beta", Since: base.Add(2 * time.Minute), Denied: true, Limit: 5}, []string{"e5"}},
		{"none", audit.Filter{Project: "none"}, nil},
	} {
		for i, l := range h {
			if got := query(t, l, tc.f); !slices.Equal(got, tc.want) {
				t.Errorf("%s, replica %d: %v, want %v", tc.name, i, got, tc.want)
			}
		}
	}
}

func testAuditFields(t *testing.T, open openAudit) {
	ctx := context.Background()
	l := open(t, 1)[0]
	want := audit.Event{
		Time: time.Now().UTC().Truncate(time.Second), Replica: "r1", Project: "acme", TokenID: "0123456789abcdef",
		Client: "10.0.0.7:5555", Action: audit.ActionPull, Via: audit.ViaKubelet, Upstream: "ghcr.io",
		Repository: "acme/app", Reference: "v1", Digest: "sha256:" + fmt.Sprintf("%064x", 7), Secret: "ghcr",
		Decision: audit.Denied, Reason: "upstream refused the pull secret", Status: 403, Subject: "system:serviceaccount:ns:sa",
	}
	if err := l.Record(ctx, want); err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	if err := l.Record(ctx, audit.Event{Project: "acme", Action: audit.ActionCredential, Via: audit.ViaHelper, Decision: audit.Allowed, Reference: "stamped"}); err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	events, err := l.Query(ctx, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 2 {
		t.Fatalf("%d events, want 2", len(events))
	}
	got := events[0]
	if !got.Time.Equal(want.Time) {
		t.Fatalf("time %s, want %s", got.Time, want.Time)
	}
	got.Time = want.Time
	if got != want {
		t.Fatalf("event read back as\n%+v\nwant\n%+v", got, want)
	}
	// A zero time is stamped with the time of the call.
	if s := events[1].Time; s.Before(before.Add(-time.Millisecond)) || s.After(after) {
		t.Fatalf("zero time stamped %s, want between %s and %s", s, before, after)
	}
}

func testAuditConcurrent(t *testing.T, open openAudit) {
	ctx := context.Background()
	h := open(t, 3)
	const goroutines, each = 6, 50
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				e := audit.Event{Project: "acme", Action: audit.ActionPull, Via: audit.ViaProxy, Decision: audit.Allowed, Reference: fmt.Sprintf("g%d-%d", g, i)}
				if err := h[g%len(h)].Record(ctx, e); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	flush(t, h...)
	got := query(t, h[0], audit.Filter{Project: "acme"})
	if len(got) != goroutines*each {
		t.Fatalf("%d events, want %d", len(got), goroutines*each)
	}
	slices.Sort(got)
	if n := len(slices.Compact(got)); n != goroutines*each {
		t.Fatalf("%d distinct events, want %d", n, goroutines*each)
	}
}

func testAuditClosed(t *testing.T, open openAudit) {
	ctx := context.Background()
	h := open(t, 2)
	if err := h[0].Record(ctx, audit.Event{Project: "acme", Action: audit.ActionPull, Via: audit.ViaProxy, Decision: audit.Allowed, Reference: "last"}); err != nil {
		t.Fatal(err)
	}
	// Close writes what is queued.
	if err := h[0].Close(); err != nil {
		t.Fatal(err)
	}
	if got := query(t, h[1], audit.Filter{}); !slices.Equal(got, []string{"last"}) {
		t.Fatalf("after Close: %v, want the queued event", got)
	}
	if err := h[0].Record(ctx, audit.Event{Project: "acme"}); !errors.Is(err, audit.ErrClosed) {
		t.Fatalf("Record after Close = %v, want audit.ErrClosed", err)
	}
}

// TestAuditLogDatabaseDown: events that cannot be written are reported by
// Flush, and the writer keeps going once the database is back.
func TestAuditLogDatabaseDown(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := open(t, pgtest.DSN(t))
	a := db.OpenAuditLog()
	defer a.Close()
	// The table goes away under the writer, then comes back.
	if _, err := db.pool.Exec(ctx, "ALTER TABLE audit_events RENAME TO audit_events_away"); err != nil {
		t.Fatal(err)
	}
	if err := a.Record(ctx, audit.Event{Project: "acme", Reference: "lost", Decision: audit.Allowed}); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(ctx); err == nil {
		t.Fatal("Flush reported no failure while the table was away")
	}
	if _, err := db.pool.Exec(ctx, "ALTER TABLE audit_events_away RENAME TO audit_events"); err != nil {
		t.Fatal(err)
	}
	if err := a.Record(ctx, audit.Event{Project: "acme", Reference: "kept", Decision: audit.Allowed}); err != nil {
		t.Fatal(err)
	}
	if got := query(t, a, audit.Filter{}); !slices.Equal(got, []string{"kept"}) {
		t.Fatalf("after the table came back: %v, want [kept]", got)
	}
}
