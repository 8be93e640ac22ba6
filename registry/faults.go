package registry

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"strconv"
	"sync"
	"time"
)

// Faults injects failures into an HTTP handler: it wraps any handler (the
// registry's, a proxy's, a fake ECR endpoint) and applies rules matched by
// method and path. Rules are tried in the order they were added; the first
// one that matches and has firings left applies to the request, and the
// request is otherwise untouched. Faults is safe for concurrent use and can be
// changed while requests are being served.
type Faults struct {
	mu    sync.Mutex
	rules []*Rule
}

// NewFaults returns a Faults without rules, which passes every request
// through.
func NewFaults() *Faults { return &Faults{} }

// Rule is a fault installed with Faults.Add.
type Rule struct {
	owner  *Faults
	method string
	path   *regexp.Regexp
	fault  Fault
	left   int // firings left; negative means unlimited
	fired  int
}

// RuleOption modifies a Rule as it is added.
type RuleOption func(*Rule)

// Times limits a rule to its first n matching requests; after that it stops
// matching and later rules (or the handler itself) see the requests.
func Times(n int) RuleOption {
	return func(r *Rule) { r.left = n }
}

// Add installs fault for requests whose method is method ("" or "*" for any)
// and whose URL path matches the regular expression path (unanchored; "" for
// any).
func (f *Faults) Add(method, path string, fault Fault, opts ...RuleOption) (*Rule, error) {
	if fault.kind == 0 {
		return nil, errors.New("registry: zero Fault; use Latency, Status, TooManyRequests, Truncate, Corrupt or Drop")
	}
	re, err := regexp.Compile(path)
	if err != nil {
		return nil, fmt.Errorf("registry: fault path pattern: %w", err)
	}
	if method == "*" {
		method = ""
	}
	r := &Rule{owner: f, method: method, path: re, fault: fault, left: -1}
	for _, o := range opts {
		o(r)
	}
	f.mu.Lock()
	f.rules = append(f.rules, r)
	f.mu.Unlock()
	return r, nil
}

// MustAdd is Add for patterns known to be valid; it panics on error.
func (f *Faults) MustAdd(method, path string, fault Fault, opts ...RuleOption) *Rule {
	r, err := f.Add(method, path, fault, opts...)
	if err != nil {
		panic(err)
	}
	return r
}

// Remove uninstalls r.
func (f *Faults) Remove(r *Rule) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, x := range f.rules {
		if x == r {
			f.rules = append(f.rules[:i:i], f.rules[i+1:]...)
			return
		}
	}
}

// Clear removes every rule.
func (f *Faults) Clear() {
	f.mu.Lock()
	f.rules = nil
	f.mu.Unlock()
}

// Fired reports how many requests the rule has applied to.
func (r *Rule) Fired() int {
	r.owner.mu.Lock()
	defer r.owner.mu.Unlock()
	return r.fired
}

// match picks the fault for req and spends one firing of its rule.
func (f *Faults) match(req *http.Request) (Fault, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.rules {
		if r.left == 0 ||
			(r.method != "" && r.method != req.Method) ||
			!r.path.MatchString(req.URL.Path) {
			continue
		}
		r.fired++
		if r.left > 0 {
			r.left--
		}
		return r.fault, true
	}
	return Fault{}, false
}

// Wrap returns next with the faults applied.
func (f *Faults) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		fault, ok := f.match(req)
		if !ok {
			next.ServeHTTP(w, req)
			return
		}
		fault.serve(w, req, next)
	})
}

type faultKind int

const (
	_ faultKind = iota
	faultLatency
	faultStatus
	faultTooMany
	faultTruncate
	faultCorrupt
	faultDrop
)

// Fault is what a rule does to a request. Make one with Latency, Status,
// TooManyRequests, Truncate, Corrupt or Drop.
type Fault struct {
	kind   faultKind
	d      time.Duration
	status int
	n      int64
}

// Latency delays the request by d, then lets the handler serve it. A client
// that gives up first ends the delay and the request.
func Latency(d time.Duration) Fault { return Fault{kind: faultLatency, d: d} }

// Status answers with code and a registry JSON error body whose error code
// fits the status and path (BLOB_UNKNOWN for a 404 on a blob, and so on),
// without calling the handler.
func Status(code int) Fault { return Fault{kind: faultStatus, status: code} }

// TooManyRequests answers 429 TOOMANYREQUESTS with a Retry-After header of
// retryAfter rounded up to whole seconds.
func TooManyRequests(retryAfter time.Duration) Fault {
	return Fault{kind: faultTooMany, d: retryAfter}
}

// Truncate lets the handler send its status, headers (Content-Length
// included) and the first n body bytes, then closes the connection.
func Truncate(n int64) Fault { return Fault{kind: faultTruncate, n: n} }

// Corrupt lets the handler serve the request but inverts the body byte at
// offset (all its bits), so the length is right and the digest is wrong.
func Corrupt(offset int64) Fault { return Fault{kind: faultCorrupt, n: offset} }

// Drop closes the connection without any response.
//
// Go's http.Transport silently retries an idempotent request (GET, HEAD)
// once when a reused keep-alive connection closes before any response, so a
// Go client on a warm connection does not notice Drop with Times(1): give it
// Times(2) (or no limit) to make the failure visible, and count on the
// handler being reached once by the retry otherwise.
func Drop() Fault { return Fault{kind: faultDrop} }

// String describes the fault, for test failure messages.
func (f Fault) String() string {
	switch f.kind {
	case faultLatency:
		return "latency " + f.d.String()
	case faultStatus:
		return "status " + strconv.Itoa(f.status)
	case faultTooMany:
		return "429 retry-after " + f.d.String()
	case faultTruncate:
		return "truncate after " + strconv.FormatInt(f.n, 10) + " bytes"
	case faultCorrupt:
		return "corrupt byte " + strconv.FormatInt(f.n, 10)
	case faultDrop:
		return "drop connection"
	}
	return "no fault"
}

func (f Fault) serve(w http.ResponseWriter, req *http.Request, next http.Handler) {
	switch f.kind {
	case faultLatency:
		t := time.NewTimer(f.d)
		defer t.Stop()
		select {
		case <-t.C:
			next.ServeHTTP(w, req)
		case <-req.Context().Done():
		}
	case faultStatus:
		writeError(w, f.status, errorCode(f.status, req.URL.Path), "injected fault: "+http.StatusText(f.status))
	case faultTooMany:
		secs := int64(math.Ceil(f.d.Seconds()))
		w.Header().Set("Retry-After", strconv.FormatInt(secs, 10))
		writeError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", "injected fault: too many requests")
	case faultTruncate:
		tw := &truncatingWriter{ResponseWriter: w, left: f.n}
		next.ServeHTTP(tw, req)
		closeConn(w, true)
	case faultCorrupt:
		next.ServeHTTP(&corruptingWriter{ResponseWriter: w, at: f.n}, req)
	case faultDrop:
		closeConn(w, false)
	}
}

// closeConn hijacks the connection and closes it. With flush it first sends
// what the handler has written, so the client gets exactly that and then EOF.
// The explicit Flush matters: Hijack flushes the headers and the connection's
// buffer but not the response's own body buffer, whose bytes would be lost.
// Without flush nothing at all is sent (Flush would send a 200 header even if
// the handler wrote nothing).
func closeConn(w http.ResponseWriter, flush bool) {
	rc := http.NewResponseController(w)
	if flush {
		_ = rc.Flush()
	}
	conn, _, err := rc.Hijack()
	if err != nil {
		// HTTP/2 cannot hijack; aborting the handler resets the stream,
		// which clients see the same way.
		panic(http.ErrAbortHandler)
	}
	_ = conn.Close()
}

var errTruncated = errors.New("registry: response truncated by fault")

// truncatingWriter passes the first left body bytes, then fails writes so the
// handler stops producing the rest.
type truncatingWriter struct {
	http.ResponseWriter
	left int64
}

func (w *truncatingWriter) Write(p []byte) (int, error) {
	if int64(len(p)) <= w.left {
		n, err := w.ResponseWriter.Write(p)
		w.left -= int64(n)
		return n, err
	}
	n, err := w.ResponseWriter.Write(p[:w.left])
	w.left -= int64(n)
	if err == nil {
		err = errTruncated
	}
	return n, err
}

func (w *truncatingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// corruptingWriter inverts the body byte at offset at.
type corruptingWriter struct {
	http.ResponseWriter
	off int64 // body bytes written so far
	at  int64
}

func (w *corruptingWriter) Write(p []byte) (int, error) {
	if i := w.at - w.off; i >= 0 && i < int64(len(p)) {
		q := make([]byte, len(p)) // never modify the handler's buffer
		copy(q, p)
		q[i] ^= 0xff
		p = q
	}
	n, err := w.ResponseWriter.Write(p)
	w.off += int64(n)
	return n, err
}

func (w *corruptingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
