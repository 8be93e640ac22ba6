package audit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func openTemp(t *testing.T, opts ...FileOption) *File {
	t.Helper()
	f, err := OpenFile(filepath.Join(t.TempDir(), "sub", FileName), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// checkLines reads path and fails on any line that is not one whole JSON
// event; it returns the events in file order.
func checkLines(t *testing.T, path string) []Event {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > 0 && b[len(b)-1] != '\n' {
		t.Fatalf("%s does not end with a newline", path)
	}
	var out []Event
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		var e Event
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&e); err != nil || dec.More() {
			t.Fatalf("line %d is not one whole event (%v): %.200q", n, err, sc.Text())
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestFileQueryFilters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := openTemp(t)
	base := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	events := []Event{
		{Time: base, Project: "acme", TokenID: "a1", Action: ActionPull, Via: ViaProxy, Upstream: "ghcr.io", Repository: "acme/app", Reference: "v1", Digest: "sha256:aa", Decision: Allowed, Status: 200},
		{Time: base.Add(time.Minute), Project: "beta", TokenID: "b1", Action: ActionPull, Via: ViaProxy, Upstream: "ghcr.io", Repository: "acme/app", Decision: Denied, Reason: "not an upstream of project beta", Status: 403},
		{Time: base.Add(2 * time.Minute), Project: "acme", Action: ActionCredential, Via: ViaHelper, Upstream: "ghcr.io", Secret: "gh", Decision: Allowed},
		{Time: base.Add(3 * time.Minute), Project: "acme", Action: ActionPull, Via: ViaProxy, Decision: Denied, Reason: "revoked"},
		// Recorded late (another process's clock, a slow queue): Query
		// still returns time order.
		{Time: base.Add(30 * time.Second), Project: "acme", Action: ActionPush, Via: ViaProxy, Decision: Allowed},
	}
	for _, e := range events {
		if err := f.Record(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	times := func(evs []Event) []int {
		var out []int
		for _, e := range evs {
			out = append(out, int(e.Time.Sub(base)/time.Second))
		}
		return out
	}
	for _, tc := range []struct {
		name string
		flt  Filter
		want []int // seconds after base, in order
	}{
		{"all", Filter{}, []int{0, 30, 60, 120, 180}},
		{"project", Filter{Project: "acme"}, []int{0, 30, 120, 180}},
		{"denied", Filter{Denied: true}, []int{60, 180}},
		{"project denied", Filter{Project: "acme", Denied: true}, []int{180}},
		{"since", Filter{Since: base.Add(time.Minute)}, []int{60, 120, 180}},
		{"limit keeps the most recent", Filter{Limit: 2}, []int{120, 180}},
		{"limit above count", Filter{Limit: 10}, []int{0, 30, 60, 120, 180}},
		{"nothing", Filter{Project: "nobody"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := f.Query(ctx, tc.flt)
			if err != nil {
				t.Fatal(err)
			}
			if g := times(got); fmt.Sprint(g) != fmt.Sprint(tc.want) {
				t.Fatalf("got events at %v s, want %v", g, tc.want)
			}
		})
	}
	got, _ := f.Query(ctx, Filter{Project: "beta"})
	if len(got) != 1 || got[0] != events[1] {
		t.Fatalf("round trip: got %+v, want %+v", got, events[1])
	}
}

func TestFileModeAndZeroTime(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("X", 3600))
	f := openTemp(t, WithClock(func() time.Time { return now }))
	if err := f.Record(context.Background(), Event{Project: "p", Action: ActionPull, Via: ViaProxy, Decision: Allowed}); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(f.Path())
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	if dst, _ := os.Stat(filepath.Dir(f.Path())); dst.Mode().Perm() != 0o700 {
		t.Errorf("folder mode %v, want 0700", dst.Mode().Perm())
	}
	evs := checkLines(t, f.Path())
	if len(evs) != 1 || !evs[0].Time.Equal(now) || evs[0].Time.Location() != time.UTC {
		t.Fatalf("got %+v, want one event at %s in UTC", evs, now)
	}
	// A file someone made readable by others is made private again.
	os.Chmod(f.Path(), 0o644)
	g, err := OpenFile(f.Path())
	if err != nil {
		t.Fatal(err)
	}
	g.Close()
	if st, _ := os.Stat(f.Path()); st.Mode().Perm() != 0o600 {
		t.Errorf("reopened: mode %v, want 0600", st.Mode().Perm())
	}
}

// TestFileConcurrentGoroutines: many goroutines on one File, and two Files
// (two open file descriptions, as two processes have) on the same path.
func TestFileConcurrentGoroutines(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	a, err := OpenFile(path, WithQueueSize(16)) // a small queue: Record waits
	if err != nil {
		t.Fatal(err)
	}
	b, err := OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const writers, each = 16, 300
	long := strings.Repeat("r", 3000) // lines of ~3 KiB: batches of many KiB
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := a
			if w%2 == 1 {
				l = b
			}
			for i := range each {
				e := Event{Project: "p" + strconv.Itoa(w), Action: ActionPull, Via: ViaProxy, Decision: Allowed,
					Reference: strconv.Itoa(i), Reason: long}
				if err := l.Record(ctx, e); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	evs := checkLines(t, path)
	if len(evs) != writers*each {
		t.Fatalf("%d events, want %d", len(evs), writers*each)
	}
	// Each writer's events are all there, in its order.
	next := map[string]int{}
	for _, e := range evs {
		if want := strconv.Itoa(next[e.Project]); e.Reference != want {
			t.Fatalf("%s: event %s, want %s", e.Project, e.Reference, want)
		}
		next[e.Project]++
	}
	if err := a.Record(ctx, Event{}); !errors.Is(err, ErrClosed) {
		t.Errorf("Record after Close: %v, want ErrClosed", err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

const childEnv = "AUDIT_TEST_CHILD"

// TestFileConcurrentProcesses: two processes append to the same file at
// once; no line is split or mixed with another.
func TestFileConcurrentProcesses(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), FileName)
	const procs, each = 2, 2000
	var cmds []*exec.Cmd
	for p := range procs {
		cmd := exec.Command(os.Args[0], "-test.run=^TestChildWriter$")
		cmd.Env = append(os.Environ(), childEnv+"="+path+","+strconv.Itoa(p)+","+strconv.Itoa(each))
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("child %d:\n%s", p, out.String())
			}
		})
		cmds = append(cmds, cmd)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("child %d: %v", i, err)
		}
	}
	evs := checkLines(t, path)
	count := map[string]int{}
	for _, e := range evs {
		count[e.Replica]++
	}
	for p := range procs {
		if n := count["proc"+strconv.Itoa(p)]; n != each {
			t.Errorf("process %d: %d events, want %d", p, n, each)
		}
	}
}

// TestChildWriter is the body of TestFileConcurrentProcesses's children.
func TestChildWriter(t *testing.T) {
	spec := os.Getenv(childEnv)
	if spec == "" {
		t.Skip("run by TestFileConcurrentProcesses")
	}
	parts := strings.Split(spec, ",")
	n, _ := strconv.Atoi(parts[2])
	f, err := OpenFile(parts[0])
	if err != nil {
		t.Fatal(err)
	}
	l := WithReplica(f, "proc"+parts[1])
	pad := strings.Repeat(parts[1], 2000)
	for i := range n {
		if err := l.Record(context.Background(), Event{Project: "p", Action: ActionPull, Via: ViaProxy, Decision: Allowed, Reference: strconv.Itoa(i), Reason: pad}); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestFileTruncatedLastLine: a write cut short by a crash leaves half a
// line; readers skip it without failing, and the next writer's lines stay
// whole.
func TestFileTruncatedLastLine(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := openTemp(t)
	for i := range 3 {
		f.Record(ctx, Event{Project: "acme", Action: ActionPull, Via: ViaProxy, Decision: Allowed, Reference: strconv.Itoa(i)})
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	whole, _ := os.ReadFile(f.Path())
	line, _ := json.Marshal(Event{Time: time.Now(), Project: "acme", Action: ActionPull, Via: ViaProxy, Decision: Denied})
	if err := os.WriteFile(f.Path(), append(whole, line[:len(line)/2]...), 0o600); err != nil {
		t.Fatal(err)
	}

	evs, skipped, err := ReadFile(ctx, f.Path(), Filter{})
	if err != nil || skipped != 0 || len(evs) != 3 {
		t.Fatalf("after a crash: %d events, %d skipped, err %v; want 3, 0, nil", len(evs), skipped, err)
	}

	g, err := OpenFile(f.Path())
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Record(ctx, Event{Project: "acme", Action: ActionPull, Via: ViaProxy, Decision: Allowed, Reference: "after"}); err != nil {
		t.Fatal(err)
	}
	got, err := g.Query(ctx, Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 || got[3].Reference != "after" {
		t.Fatalf("after the restart: %+v", got)
	}
	g.Close()
	_, skipped, _ = ReadFile(ctx, f.Path(), Filter{})
	if skipped != 1 {
		t.Errorf("the ended fragment: %d skipped, want 1", skipped)
	}
}

func TestReadBadLines(t *testing.T) {
	t.Parallel()
	ok := `{"time":"2026-01-01T00:00:00Z","project":"a","action":"pull","via":"proxy","decision":"allowed"}`
	for _, tc := range []struct {
		name    string
		in      string
		events  int
		skipped int
	}{
		{"empty", "", 0, 0},
		{"blank lines", "\n\n" + ok + "\n\n", 1, 0},
		{"garbage line", ok + "\nnot json\n" + ok + "\n", 2, 1},
		{"no time", `{"project":"a"}` + "\n" + ok + "\n", 1, 1},
		{"unknown field kept", `{"time":"2026-01-01T00:00:00Z","project":"a","new_field":1,"decision":"denied"}` + "\n", 1, 0},
		{"huge line", ok + "\n" + `{"reason":"` + strings.Repeat("x", maxLine+10) + "\"}\n" + ok + "\n", 2, 1},
		{"huge last line cut", ok + "\n" + strings.Repeat("x", maxLine+10), 1, 0},
		{"last line without newline", ok + "\n" + ok[:len(ok)/2], 1, 0},
		{"complete last line without newline", ok + "\n" + ok, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			evs, skipped, err := Read(context.Background(), strings.NewReader(tc.in), Filter{})
			if err != nil || len(evs) != tc.events || skipped != tc.skipped {
				t.Fatalf("%d events, %d skipped, err %v; want %d, %d", len(evs), skipped, err, tc.events, tc.skipped)
			}
		})
	}
	if _, _, err := ReadFile(context.Background(), filepath.Join(t.TempDir(), "none"), Filter{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// TestFileRotation: after the file is renamed away, new records go to a
// new file at the path.
func TestFileRotation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := openTemp(t, withReopenCheck(0))
	f.Record(ctx, Event{Project: "a", Decision: Allowed, Reference: "old"})
	if err := f.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(f.Path(), f.Path()+".1"); err != nil {
		t.Fatal(err)
	}
	f.Record(ctx, Event{Project: "a", Decision: Allowed, Reference: "new"})
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if evs := checkLines(t, f.Path()+".1"); len(evs) != 1 || evs[0].Reference != "old" {
		t.Errorf("rotated file: %+v", evs)
	}
	if evs := checkLines(t, f.Path()); len(evs) != 1 || evs[0].Reference != "new" {
		t.Errorf("new file: %+v", evs)
	}
}

func TestRecordWaitsForRoomUntilContextEnds(t *testing.T) {
	t.Parallel()
	f := openTemp(t, WithQueueSize(1))
	// Stall the writer: it blocks handing a flush result to nobody.
	block := make(chan error)
	if err := f.q.send(context.Background(), item{flush: block}); err != nil {
		t.Fatal(err)
	}
	// Once the writer is stuck, one event fills the queue and the next
	// waits for room until its context ends.
	var recorded []string
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		p := "p" + strconv.Itoa(i)
		if err = f.Record(ctx, Event{Project: p}); err == nil {
			recorded = append(recorded, p)
		}
		cancel()
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Record on a full queue: %v, want the context's error", err)
	}
	<-block // let the writer go
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range checkLines(t, f.Path()) {
		got = append(got, e.Project)
	}
	if fmt.Sprint(got) != fmt.Sprint(recorded) {
		t.Fatalf("written %v, want what Record accepted: %v", got, recorded)
	}
}

func TestWithReplica(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := openTemp(t)
	if WithReplica(f, "") != Log(f) {
		t.Error("an empty replica name should not wrap")
	}
	l := WithReplica(f, "r1")
	l.Record(ctx, Event{Project: "a"})
	l.Record(ctx, Event{Project: "b", Replica: "other"})
	got, err := l.Query(ctx, Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Replica != "r1" || got[1].Replica != "other" {
		t.Fatalf("%+v", got)
	}
}
