package registry

import (
	"bufio"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Request is one request the registry received, as recorded by the request
// log. It never holds a header value: tests assert on credentials through
// AuthorizationSeen, or through WithRequestHook when they need more.
type Request struct {
	Time   time.Time // when the request arrived
	Method string
	Path   string
	Query  string // raw query string, without '?'
	// Status is the status code sent, or 0 when the connection was closed
	// before any response (a Drop fault).
	Status int
	// Bytes is the number of body bytes written to the client.
	Bytes int64
	// Aborted is true when a fault closed the connection (Drop, Truncate).
	Aborted bool
	// AuthorizationSeen is true when the request carried an Authorization
	// header, whatever its scheme.
	AuthorizationSeen bool
	Duration          time.Duration
}

var (
	blobPath     = regexp.MustCompile(`^/v2/(.+)/blobs/([A-Za-z0-9_+.-]+:[A-Fa-f0-9]+)$`)
	manifestPath = regexp.MustCompile(`^/v2/(.+)/manifests/([^/]+)$`)
)

type recorder struct {
	mu   sync.Mutex
	reqs []Request
}

func newRecorder() *recorder { return &recorder{} }

func (rec *recorder) wrap(h http.Handler, hooks []func(*http.Request), log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		for _, hook := range hooks {
			hook(req)
		}
		rw := &recordingWriter{ResponseWriter: w, want: -1}
		start := time.Now()
		rw.finish = func() {
			status := rw.status
			if status == 0 && !rw.hijacked {
				status = http.StatusOK // what net/http sends for a handler that wrote nothing
			}
			e := Request{
				Time:              start,
				Method:            req.Method,
				Path:              req.URL.Path,
				Query:             req.URL.RawQuery,
				Status:            status,
				Bytes:             rw.bytes,
				Aborted:           rw.hijacked,
				AuthorizationSeen: req.Header.Get("Authorization") != "",
				Duration:          time.Since(start),
			}
			rec.mu.Lock()
			rec.reqs = append(rec.reqs, e)
			rec.mu.Unlock()
			log.LogAttrs(req.Context(), slog.LevelDebug, "registry request",
				slog.String("method", e.Method), slog.String("path", e.Path),
				slog.Int("status", e.Status), slog.Int64("bytes", e.Bytes),
				slog.Bool("authorization", e.AuthorizationSeen), slog.Bool("aborted", e.Aborted))
		}
		// Deferred so that a handler aborting with http.ErrAbortHandler is
		// recorded too.
		defer rw.record()
		h.ServeHTTP(rw, req)
	})
}

// recordingWriter counts what reaches the client and records the request
// before the client can have seen the end of the response, so that a test
// that has just read a whole body always finds its request in the log:
//   - a body with a Content-Length: just before its last byte is written;
//   - a hijacked connection: before the hijacker gets it (and closes it);
//   - anything else: when the handler returns, which is before net/http
//     flushes the buffered tail of the response.
//
// It implements Flush and Hijack itself (rather than only Unwrap) so that a
// hijack is noticed.
type recordingWriter struct {
	http.ResponseWriter
	status   int
	bytes    int64
	want     int64 // declared Content-Length, or -1
	hijacked bool
	finish   func()
	recorded bool
}

func (w *recordingWriter) record() {
	if !w.recorded {
		w.recorded = true
		w.finish()
	}
}

func (w *recordingWriter) WriteHeader(code int) {
	// 1xx responses are informational; the final status comes later.
	if w.status == 0 && code >= 200 {
		w.status = code
		if n, err := strconv.ParseInt(w.Header().Get("Content-Length"), 10, 64); err == nil {
			w.want = n
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordingWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.recorded || w.want < 0 || len(p) == 0 || w.bytes+int64(len(p)) < w.want {
		n, err := w.ResponseWriter.Write(p)
		w.bytes += int64(n)
		return n, err
	}
	// This write completes the declared body.
	n, err := w.ResponseWriter.Write(p[:len(p)-1])
	w.bytes += int64(n)
	if err != nil {
		return n, err
	}
	w.bytes++ // the last byte, about to be written
	w.record()
	m, err := w.ResponseWriter.Write(p[len(p)-1:])
	return n + m, err
}

func (w *recordingWriter) Flush() {
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *recordingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil {
		w.hijacked = true
		w.record()
	}
	return c, rw, err
}

func (w *recordingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Requests returns a copy of the request log, oldest first. Requests made by
// the Seed helpers are not in it.
func (r *Registry) Requests() []Request {
	r.rec.mu.Lock()
	defer r.rec.mu.Unlock()
	return slices.Clone(r.rec.reqs)
}

// ResetRequests empties the request log.
func (r *Registry) ResetRequests() {
	r.rec.mu.Lock()
	r.rec.reqs = nil
	r.rec.mu.Unlock()
}

// BlobFetches counts the GETs of blob digest (in any repository) that were
// answered 200 or 206 with at least one body byte: how many times the
// registry actually served the blob's content.
func (r *Registry) BlobFetches(digest string) int {
	n := 0
	for _, e := range r.Requests() {
		if e.Method != http.MethodGet || e.Bytes == 0 ||
			(e.Status != http.StatusOK && e.Status != http.StatusPartialContent) {
			continue
		}
		if m := blobPath.FindStringSubmatch(e.Path); m != nil && m[2] == digest {
			n++
		}
	}
	return n
}
