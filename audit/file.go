package audit

// The embedded audit log: JSON lines appended to one file.
//
// Several processes may append to the same file (a server and a restarted
// one, two servers on one data folder): the file is opened with O_APPEND
// and every write(2) carries whole lines only, so the kernel's append
// (offset update and copy under the inode lock, on local file systems)
// never splits a line between writers. Records are queued and written by
// one goroutine, in batches, so a pull never waits for the disk.
//
// What can be lost: Close writes everything queued and syncs the file, so a
// graceful shutdown loses nothing. On SIGKILL (or a crash of the process)
// the events still queued in memory are lost, at most the queue's capacity
// and in practice the last few milliseconds of requests; what was written
// is in the kernel and survives. A crash of the machine can also lose what
// the kernel had not yet put on disk. A write cut short (a full disk, a
// crash in the middle of a write) leaves an incomplete last line: readers
// leave it out, and the next process to open the file ends it with a
// newline so that its own lines stay whole (readers then count it as
// skipped).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// FileName is the audit log's name in the data folder.
const FileName = "audit.jsonl"

// Defaults of File.
const (
	DefaultQueueSize = 8192
	// maxBatch bounds one write: whole lines up to this many bytes.
	maxBatch = 64 << 10
	// queueBatch is how many events the writer takes from the queue at a
	// time (written maxBatch bytes per write(2)).
	queueBatch = 1024
	// maxLine is the longest line readers accept; longer ones are skipped.
	maxLine = 1 << 20
	// reopenCheck is how often the writer checks that the path still names
	// its file, so that a rotation by rename is followed.
	reopenCheck = time.Second
)

// ErrClosed is returned by Record and Flush after Close.
var ErrClosed = errors.New("audit: log closed")

// File is a Log kept as JSON lines in one file. Its methods are safe for
// concurrent use.
type File struct {
	path      string
	log       *slog.Logger
	now       func() time.Time
	queueSize int
	q         *Queue

	reopenEvery time.Duration

	// Owned by the writer goroutine.
	f       *os.File
	checked time.Time
	buf     []byte
	lost    int // events lost since the last report
}

// FileOption configures OpenFile.
type FileOption func(*File)

// WithLogger sets where write failures are reported (default: discard).
func WithLogger(l *slog.Logger) FileOption {
	return func(f *File) {
		if l != nil {
			f.log = l
		}
	}
}

// WithQueueSize sets how many events may wait for the writer (default
// DefaultQueueSize). When the queue is full, Record waits for room until
// its context ends.
func WithQueueSize(n int) FileOption {
	return func(f *File) {
		if n > 0 {
			f.queueSize = n
		}
	}
}

// WithClock sets the clock that stamps events recorded without a time.
func WithClock(now func() time.Time) FileOption {
	return func(f *File) { f.now = now }
}

// OpenFile opens (creating it, mode 0600, and its folder, 0700) the audit
// log at path for appending, and starts its writer. Close it to flush.
func OpenFile(path string, opts ...FileOption) (*File, error) {
	f := &File{path: path, log: slog.New(slog.DiscardHandler), now: time.Now, reopenEvery: reopenCheck, queueSize: DefaultQueueSize}
	for _, o := range opts {
		o(f)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	fh, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	f.f, f.checked = fh, time.Now()
	f.q = NewQueue(f.queueSize, queueBatch, f.writeEvents)
	return f, nil
}

// openAppend opens path for appending and ends an incomplete last line,
// left by a write that was cut short, so that the next line stays whole.
func openAppend(path string) (*os.File, error) {
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	st, err := fh.Stat()
	if err != nil {
		fh.Close()
		return nil, fmt.Errorf("audit log %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		fh.Close()
		return nil, fmt.Errorf("audit log %s: not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		// Who pulled what is nobody else's business.
		if err := fh.Chmod(0o600); err != nil {
			fh.Close()
			return nil, fmt.Errorf("audit log %s: %w", path, err)
		}
	}
	if st.Size() > 0 {
		last, err := lastByte(path, st.Size())
		if err != nil {
			fh.Close()
			return nil, fmt.Errorf("audit log %s: %w", path, err)
		}
		if last != '\n' {
			if _, err := fh.Write([]byte{'\n'}); err != nil {
				fh.Close()
				return nil, fmt.Errorf("audit log %s: %w", path, err)
			}
		}
	}
	return fh, nil
}

func lastByte(path string, size int64) (byte, error) {
	r, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	b := make([]byte, 1)
	if _, err := r.ReadAt(b, size-1); err != nil {
		return 0, err
	}
	return b[0], nil
}

// Path is the file's path.
func (f *File) Path() string { return f.path }

// Record queues e for writing. It waits only when the queue is full, and
// then no longer than ctx allows.
func (f *File) Record(ctx context.Context, e Event) error {
	if e.Time.IsZero() {
		e.Time = f.now()
	}
	e.Time = e.Time.UTC()
	return f.q.Send(ctx, e)
}

// Flush waits until every event recorded before it is written, and
// reports the first write failure since the previous Flush.
func (f *File) Flush(ctx context.Context) error { return f.q.Flush(ctx) }

// Query flushes what this process recorded, then reads the file.
func (f *File) Query(ctx context.Context, flt Filter) ([]Event, error) {
	if err := f.Flush(ctx); err != nil && !errors.Is(err, ErrClosed) {
		return nil, err
	}
	events, _, err := ReadFile(ctx, f.path, flt)
	return events, err
}

// Close writes everything queued, syncs the file and closes it. Records
// after Close fail with ErrClosed.
func (f *File) Close() error {
	if !f.q.Close() {
		return nil
	}
	err := f.f.Sync()
	if cerr := f.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("audit log %s: %w", f.path, err)
	}
	return nil
}

// writeEvents is the queue's writer: the batch as JSON lines, whole lines
// up to maxBatch bytes per write(2).
func (f *File) writeEvents(batch []Event) error {
	var failed error
	flush := func(n int) {
		if len(f.buf) == 0 {
			return
		}
		if err := f.write(f.buf); err != nil {
			f.lost += n
			if failed == nil {
				failed = err
			}
			f.log.Error("audit: write failed; events lost", "path", f.path, "events", f.lost, "err", err)
		} else {
			f.lost = 0
		}
		f.buf = f.buf[:0]
	}
	n := 0
	for _, e := range batch {
		b, err := json.Marshal(e)
		if err != nil { // cannot happen: Event holds strings, a time and ints
			f.log.Error("audit: event not encodable", "err", err)
			continue
		}
		f.buf = append(append(f.buf, b...), '\n')
		n++
		if len(f.buf) >= maxBatch {
			flush(n)
			n = 0
		}
	}
	flush(n)
	return failed
}

// write appends buf (whole lines) with one write(2), reopening the file
// first when it was rotated away.
func (f *File) write(buf []byte) error {
	if now := time.Now(); now.Sub(f.checked) >= f.reopenEvery {
		f.checked = now
		if err := f.reopenIfMoved(); err != nil {
			// Keep appending to the file already open: a record in a
			// rotated file beats a lost one.
			f.log.Warn("audit: cannot reopen the log after a rotation", "path", f.path, "err", err)
		}
	}
	_, err := f.f.Write(buf)
	return err
}

// reopenIfMoved follows a rotation by rename: when the path no longer
// names the open file, the file at the path (created if need be) is used
// from now on.
func (f *File) reopenIfMoved() error {
	cur, err1 := f.f.Stat()
	at, err2 := os.Stat(f.path)
	if err1 == nil && err2 == nil && os.SameFile(cur, at) {
		return nil
	}
	fh, err := openAppend(f.path)
	if err != nil {
		return err
	}
	f.f.Close()
	f.f = fh
	return nil
}

// ReadFile reads the audit log at path and returns the events that match
// flt (see Filter for the order and Limit). skipped counts the lines that
// are not events: a line cut short by a full disk, or by a crash and
// ended since by the next writer. Text after the last newline is a line
// still being written, or the remains of a crash: it is left out and not
// counted. A missing file is an error wrapping fs.ErrNotExist.
func ReadFile(ctx context.Context, path string, flt Filter) (events []Event, skipped int, err error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("audit log: %w", err)
	}
	defer fh.Close()
	return Read(ctx, fh, flt)
}

// Read is ReadFile over r.
func Read(ctx context.Context, r io.Reader, flt Filter) (events []Event, skipped int, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var (
		line    []byte
		tooLong bool // the current line is longer than maxLine
	)
	for n := 0; ; n++ {
		if n%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return nil, skipped, err
			}
		}
		chunk, rerr := br.ReadSlice('\n')
		switch {
		case rerr == bufio.ErrBufferFull:
			// Longer than the buffer: gather it, up to maxLine.
			if !tooLong {
				line = append(line, chunk...)
				if len(line) > maxLine {
					tooLong, line = true, line[:0]
				}
			}
			continue
		case rerr == io.EOF:
			slices.SortStableFunc(events, func(a, b Event) int { return a.Time.Compare(b.Time) })
			if flt.Limit > 0 {
				events = keepRecent(events, flt.Limit)
			}
			return events, skipped, nil
		case rerr != nil:
			return nil, skipped, fmt.Errorf("audit log: %w", rerr)
		}
		if !tooLong {
			line = append(line, chunk...)
		}
		if t := bytes.TrimSpace(line); tooLong || len(t) > 0 {
			var e Event
			switch {
			case tooLong || json.Unmarshal(t, &e) != nil || e.Time.IsZero():
				skipped++
			case flt.Match(e):
				events = append(events, e)
				if flt.Limit > 0 && len(events) >= 2*flt.Limit+1024 {
					events = keepRecent(events, flt.Limit)
				}
			}
		}
		line, tooLong = line[:0], false
	}
}

// keepRecent keeps the n most recent events, oldest first.
func keepRecent(events []Event, n int) []Event {
	if len(events) <= n {
		return events
	}
	slices.SortStableFunc(events, func(a, b Event) int { return a.Time.Compare(b.Time) })
	return slices.Clone(events[len(events)-n:])
}

// withReopenCheck sets how often the writer checks for a rotation (tests).
func withReopenCheck(d time.Duration) FileOption {
	return func(f *File) { f.reopenEvery = d }
}
