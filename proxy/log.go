package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"time"
)

// NewLogger makes the server's slog logger from the log config.
func NewLogger(w io.Writer, c LogConfig) *slog.Logger {
	var lvl slog.Level
	switch c.Level {
	case "debug":
		lvl = slog.LevelDebug
	case "warn", "warning":
		lvl = slog.LevelWarn
	case "error":
		lvl = slog.LevelError
	default:
		lvl = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// reqInfo collects what a request log line and its metrics need. Handlers
// fill it in as they learn things; it holds no credential.
type reqInfo struct {
	id       string
	route    string
	project  string
	tokenID  string
	upstream string
	repo     string
	digest   string
	secret   string // name of the project's pull secret for the target
	err      *Error
	// upstreamBytes counts blob bytes read from the upstream.
	upstreamBytes int64
	// rt is the parsed registry route, for the audit trail.
	rt *route
}

type infoKey struct{}

func infoFrom(ctx context.Context) *reqInfo {
	i, _ := ctx.Value(infoKey{}).(*reqInfo)
	return i
}

func newRequestID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// statusWriter records the status and the body bytes written.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	return n, err
}

func (w *statusWriter) Flush() {
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// observe wraps h with the request log line and the request metrics.
func (s *Server) observe(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		info := &reqInfo{id: newRequestID(), route: routeName(r)}
		w.Header().Set("X-Request-Id", info.id)
		sw := &statusWriter{ResponseWriter: w}
		r = r.WithContext(context.WithValue(r.Context(), infoKey{}, info))
		s.metrics.inflight.Inc()
		aborted := false
		defer func() {
			s.metrics.inflight.Dec()
			p := recover()
			if p != nil {
				aborted = true
			}
			status := sw.status
			if status == 0 {
				if p != nil || r.Context().Err() != nil {
					status = 499
				} else {
					status = http.StatusOK
				}
			}
			d := time.Since(start)
			s.metrics.request(info.route, r.Method, status, info.project, sw.bytes, d)
			if info.upstreamBytes > 0 && info.upstream != "" {
				s.metrics.upBytes.WithLabelValues(info.upstream).Add(float64(info.upstreamBytes))
			}
			s.logRequest(r, info, status, sw.bytes, d, aborted)
			if s.audit != nil {
				s.auditRequest(r, info, status, start)
			}
			if p != nil {
				if p != http.ErrAbortHandler {
					s.log.Error("panic serving request", "request_id", info.id, "panic", redact(anyString(p)))
				}
				panic(http.ErrAbortHandler)
			}
		}()
		h.ServeHTTP(sw, r)
	})
}

func anyString(v any) string {
	switch x := v.(type) {
	case error:
		return x.Error()
	case string:
		return x
	}
	return "panic"
}

// routeName is the metrics and log label of a request path: a fixed set.
func routeName(r *http.Request) string {
	p := r.URL.Path
	switch {
	case p == "/v2/" || p == "/v2":
		return "ping"
	case strings.HasPrefix(p, "/v2/"):
		switch {
		case strings.Contains(p, "/blobs/uploads"):
			return "upload"
		case strings.Contains(p, "/manifests/"):
			return "manifest"
		case strings.Contains(p, "/blobs/"):
			return "blob"
		case strings.HasSuffix(p, "/tags/list"):
			return "tags"
		case strings.Contains(p, "/referrers/"):
			return "referrers"
		}
		return "v2-other"
	case p == "/token":
		return "token"
	case p == "/healthz" || p == "/readyz":
		return "health"
	case p == "/metrics":
		return "metrics"
	case strings.HasPrefix(p, "/api/"):
		return "api"
	}
	return "other"
}

func (s *Server) logRequest(r *http.Request, info *reqInfo, status int, bytes int64, d time.Duration, aborted bool) {
	lvl := slog.LevelInfo
	switch {
	case info.route == "health" || info.route == "metrics":
		lvl = slog.LevelDebug
	case status >= 500 && status != 499:
		lvl = slog.LevelWarn
	}
	if !s.log.Enabled(r.Context(), lvl) {
		return
	}
	path := r.URL.Path
	if len(path) > 256 {
		path = path[:256] + "..."
	}
	attrs := []slog.Attr{
		slog.String("request_id", info.id),
		slog.String("method", sanitizeMethod(r.Method)),
		slog.String("path", printableName(path)),
		slog.String("route", info.route),
		slog.Int("status", status),
		slog.Int64("bytes", bytes),
		slog.Duration("duration", d),
	}
	add := func(k, v string) {
		if v != "" {
			attrs = append(attrs, slog.String(k, v))
		}
	}
	add("project", info.project)
	add("token_id", info.tokenID)
	add("upstream", info.upstream)
	add("repo", info.repo)
	add("digest", info.digest)
	if aborted {
		attrs = append(attrs, slog.Bool("aborted", true))
	}
	if info.err != nil {
		attrs = append(attrs, slog.String("error_code", info.err.Code), slog.String("error", redact(info.err.Message)))
		if info.err.Cause != nil {
			attrs = append(attrs, slog.String("cause", redact(info.err.Cause.Error())))
		}
	}
	s.log.LogAttrs(r.Context(), lvl, "request", attrs...)
}

// sanitizeMethod bounds the method label to the methods the API uses.
func sanitizeMethod(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodOptions:
		return m
	}
	return "OTHER"
}

var redactREs = []*regexp.Regexp{
	// Authorization header values, wherever they are quoted.
	regexp.MustCompile(`(?i)\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}`),
	// JSON and form fields that hold secrets.
	regexp.MustCompile(`(?i)("?(?:token|access_token|refresh_token|password|secret|identitytoken|identity_token)"?\s*[:=]\s*"?)[^"&,\s}]+`),
	// user:password@ in URLs.
	regexp.MustCompile(`(?i)(https?://)[^/@\s:]+:[^/@\s]+@`),
	// Query parameters that carry credentials (pre-signed URLs, tokens).
	regexp.MustCompile(`(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|_state)=)[^&\s"]+`),
	// Project tokens.
	regexp.MustCompile(`pst_[A-Za-z0-9]+`),
}

// redact removes what looks like a credential from a message that goes to
// the log. Messages built by this package hold none; this is for causes
// that come from libraries (ggcr's errors can quote upstream responses).
func redact(s string) string {
	for _, re := range redactREs {
		s = re.ReplaceAllStringFunc(s, func(m string) string {
			sub := re.FindStringSubmatch(m)
			if len(sub) > 1 {
				return sub[1] + "REDACTED"
			}
			return "REDACTED"
		})
	}
	if len(s) > 1024 {
		s = s[:1024] + "..."
	}
	return s
}
