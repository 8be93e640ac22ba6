package registry

import (
	"log/slog"
	"maps"
	"net/http"
	"time"
)

// Option configures a Registry at Start.
type Option func(*options)

type options struct {
	addr     string
	tls      bool
	fsRoot   string
	htpasswd map[string]string
	token    map[string]string
	tokenTTL time.Duration
	wrappers []func(http.Handler) http.Handler
	hooks    []func(*http.Request)
	faults   *Faults
	logger   *slog.Logger
}

func defaultOptions() *options {
	return &options{
		addr:     "127.0.0.1:0",
		tokenTTL: 5 * time.Minute,
		logger:   slog.New(slog.DiscardHandler),
	}
}

// WithAddr listens on addr instead of a free port on 127.0.0.1.
func WithAddr(addr string) Option {
	return func(o *options) { o.addr = addr }
}

// WithHTPasswd turns on distribution's htpasswd (HTTP Basic) authentication
// for the given user -> password map. Every user may pull and push anything.
func WithHTPasswd(users map[string]string) Option {
	return func(o *options) { o.htpasswd = maps.Clone(users) }
}

// WithTokenAuth turns on distribution's token authentication. The registry
// answers 401 with a Bearer challenge whose realm is its own /token endpoint
// (same host:port, which go-containerregistry requires for loopback
// registries). That endpoint checks the users' passwords and issues signed
// JWTs granting what was asked for.
func WithTokenAuth(users map[string]string) Option {
	return func(o *options) { o.token = maps.Clone(users) }
}

// WithTokenTTL sets the lifetime of tokens issued under WithTokenAuth
// (default 5 minutes). distribution accepts a token up to 60 s past expiry.
func WithTokenTTL(d time.Duration) Option {
	return func(o *options) { o.tokenTTL = d }
}

// WithTLS serves HTTPS with a leaf certificate for 127.0.0.1, ::1 and
// localhost, signed by a CA generated for this registry (see CACertPEM and
// CAFile).
func WithTLS() Option {
	return func(o *options) { o.tls = true }
}

// WithFilesystem stores content under dir with distribution's filesystem
// driver instead of in memory. Close leaves dir in place.
func WithFilesystem(dir string) Option {
	return func(o *options) { o.fsRoot = dir }
}

// WithHandlerWrapper wraps the registry's handler (distribution plus the
// token endpoint). Wrappers apply in order, the last outermost; all of them
// sit inside the fault injector and the request log.
func WithHandlerWrapper(wrap func(http.Handler) http.Handler) Option {
	return func(o *options) { o.wrappers = append(o.wrappers, wrap) }
}

// WithRequestHook calls hook with every request the server receives, before
// faults and authentication. The hook sees the raw request, headers included,
// which the request log deliberately does not keep. It must not consume the
// body and must be safe for concurrent use.
func WithRequestHook(hook func(*http.Request)) Option {
	return func(o *options) { o.hooks = append(o.hooks, hook) }
}

// WithFaults uses f as the registry's fault injector, so one Faults can be
// shared by several registries.
func WithFaults(f *Faults) Option {
	return func(o *options) { o.faults = f }
}

// WithLogger logs one Debug line per request (method, path, status, bytes;
// never a header value) and the HTTP server's own errors to l.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}
