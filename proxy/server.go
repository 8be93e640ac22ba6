package proxy

// The server: one host:port for the registry API (/v2/), the token server
// (/token), the credential API, health, readiness and metrics. Routing and
// authorization happen here; content comes from a Fetcher, pushes go
// through push.go.

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/pullsecret/pullsecret/audit"
)

// Server is the pullsecret proxy server.
type Server struct {
	cfg     Config
	secrets SecretSource
	auth    Authenticator
	up      *upstreams
	direct  Fetcher
	fetch   Fetcher
	log     *slog.Logger
	metrics *metrics
	mounts  map[string]http.Handler
	uploads *uploadSealer
	handler http.Handler
	checks  []ReadyCheck
	// audit records proxied pulls and pushes (nil: none); see audit.go.
	audit audit.Log

	shuttingDown atomic.Bool
	closeOnce    sync.Once
}

// Option configures New.
type Option func(*options)

type options struct {
	logger    *slog.Logger
	wraps     []func(Fetcher) Fetcher
	mounts    map[string]http.Handler
	registry  *prometheus.Registry
	uploadKey []byte
	checks    []ReadyCheck
	audit     audit.Log
}

// ReadyCheck is one dependency /readyz probes: the object store, the
// database. Check returns nil when it is reachable.
type ReadyCheck struct {
	Name  string
	Check func(ctx context.Context) error
}

// WithReadyCheck makes /readyz answer 503 while c fails.
func WithReadyCheck(c ReadyCheck) Option {
	return func(o *options) { o.checks = append(o.checks, c) }
}

// WithUploadKey seals upload ids with key (32 bytes) instead of a key of
// this process's own, so that replicas sharing it accept each other's
// upload ids and a chunked push needs no sticky sessions.
func WithUploadKey(key []byte) Option { return func(o *options) { o.uploadKey = key } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithFetcher wraps the fetcher: wrap receives the current one (the direct
// upstream fetcher, or what an earlier WithFetcher made of it) and returns
// the one the server uses. This is where a cache slots in.
func WithFetcher(wrap func(Fetcher) Fetcher) Option {
	return func(o *options) { o.wraps = append(o.wraps, wrap) }
}

// WithHandler mounts h at path (an exact path such as "/token" or
// "/api/v1/credentials", or a prefix ending in "/"). Mounted handlers get the request log and
// metrics; their own authentication is theirs.
func WithHandler(path string, h http.Handler) Option {
	return func(o *options) { o.mounts[path] = h }
}

// WithMetricsRegistry registers the server's metrics in reg instead of a
// new registry, so other components (the cache) can add theirs to the
// same /metrics.
func WithMetricsRegistry(reg *prometheus.Registry) Option {
	return func(o *options) { o.registry = reg }
}

// New builds a server. cfg is validated; secrets is the sealed store
// (*secret.Store); auth authenticates clients.
func New(cfg Config, secrets SecretSource, auth Authenticator, opts ...Option) (*Server, error) {
	if secrets == nil || auth == nil {
		return nil, errors.New("proxy: a secret source and an authenticator are required")
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	o := &options{mounts: map[string]http.Handler{}}
	for _, opt := range opts {
		opt(o)
	}
	if o.logger == nil {
		o.logger = slog.New(slog.DiscardHandler)
	}
	if o.uploadKey != nil && len(o.uploadKey) != 32 {
		return nil, errors.New("proxy: the upload key must be 32 bytes")
	}
	s := &Server{
		cfg:     cfg,
		secrets: secrets,
		auth:    auth,
		log:     o.logger,
		metrics: newMetrics(o.registry),
		mounts:  o.mounts,
		audit:   o.audit,
	}
	up, err := newUpstreams(cfg, secrets, s.metrics)
	if err != nil {
		return nil, err
	}
	s.up = up
	s.direct = &direct{up: up, maxManifest: int64(cfg.MaxManifestSize)}
	s.fetch = s.direct
	for _, w := range o.wraps {
		s.fetch = w(s.fetch)
	}
	s.uploads = newUploadSealer(o.uploadKey)
	s.checks = o.checks
	s.handler = s.observe(http.HandlerFunc(s.route))
	return s, nil
}

// Handler is the server's whole HTTP handler.
func (s *Server) Handler() http.Handler { return s.handler }

// Direct is the fetcher that goes to the upstream every time.
func (s *Server) Direct() Fetcher { return s.direct }

// MetricsRegistry is the Prometheus registry /metrics serves.
func (s *Server) MetricsRegistry() *prometheus.Registry { return s.metrics.reg }

// Config is the validated configuration.
func (s *Server) Config() Config { return s.cfg }

// Close releases idle upstream connections.
func (s *Server) Close() error {
	s.closeOnce.Do(func() { s.up.close() })
	return nil
}

// Serve serves on ln until ctx is done, then shuts down gracefully:
// readiness turns false, the server goes on serving for ShutdownDelay, then
// new connections stop and requests in flight get up to ShutdownTimeout to
// finish.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	if s.cfg.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(s.cfg.TLSCert, s.cfg.TLSKey)
		if err != nil {
			return fmt.Errorf("tls_cert/tls_key: %w", err)
		}
		srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	}
	errc := make(chan error, 1)
	go func() {
		if srv.TLSConfig != nil {
			errc <- srv.ServeTLS(ln, "", "") // HTTP/2 and HTTP/1.1
			return
		}
		errc <- srv.Serve(ln)
	}()
	select {
	case err := <-errc:
		s.Close()
		return err
	case <-ctx.Done():
	}
	s.shuttingDown.Store(true)
	if d := s.cfg.ShutdownDelay; d > 0 {
		// Each response from now on closes its connection, so clients
		// reconnect through the balancer to a replica that stays.
		srv.SetKeepAlivesEnabled(false)
		s.log.Info("shutting down: still serving while load balancers catch up", "delay", d)
		select {
		case <-time.After(d):
		case err := <-errc:
			s.Close()
			return err
		}
	}
	s.log.Info("shutting down", "timeout", s.cfg.ShutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if errors.Is(err, context.DeadlineExceeded) {
		srv.Close()
		err = fmt.Errorf("shutdown: requests still running after %s were cut", s.cfg.ShutdownTimeout)
	}
	s.Close()
	if e := <-errc; e != nil && !errors.Is(e, http.ErrServerClosed) && err == nil {
		err = e
	}
	return err
}

// Listen opens the configured listen address.
func (s *Server) Listen() (net.Listener, error) {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", s.cfg.Listen, err)
	}
	return ln, nil
}

// route dispatches a request.
func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	switch {
	case p == "/v2/" || p == "/v2":
		s.ping(w, r)
	case strings.HasPrefix(p, "/v2/"):
		s.registryAPI(w, r)
	case p == "/healthz":
		writeText(w, http.StatusOK, "ok\n")
	case p == "/readyz":
		s.ready(w, r)
	case p == "/metrics":
		s.metrics.handler().ServeHTTP(w, r)
	default:
		if h, ok := s.mounts[p]; ok {
			h.ServeHTTP(w, r)
			return
		}
		for prefix, h := range s.mounts {
			if strings.HasSuffix(prefix, "/") && strings.HasPrefix(p, prefix) {
				h.ServeHTTP(w, r)
				return
			}
		}
		WriteError(w, r, newError(http.StatusNotFound, CodeUnsupported, "no such endpoint"))
	}
}

func writeText(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	io.WriteString(w, body)
}

func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	if s.shuttingDown.Load() {
		writeText(w, http.StatusServiceUnavailable, "shutting down\n")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	if _, err := s.secrets.List(ctx, "\x00none"); err != nil {
		s.log.Warn("not ready: secret store unreadable", "error", redact(err.Error()))
		writeText(w, http.StatusServiceUnavailable, "secret store unreadable\n")
		return
	}
	for _, c := range s.checks {
		if err := c.Check(ctx); err != nil {
			s.log.Warn("not ready", "dependency", c.Name, "error", redact(err.Error()))
			writeText(w, http.StatusServiceUnavailable, c.Name+" unreachable\n")
			return
		}
	}
	writeText(w, http.StatusOK, "ready\n")
}

// ping answers /v2/: 401 with a challenge without valid credentials, 200
// with them.
func (s *Server) ping(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		WriteError(w, r, newError(http.StatusMethodNotAllowed, CodeUnsupported, "method not allowed"))
		return
	}
	p, err := s.auth.Authenticate(r)
	if err != nil {
		s.authFailed(w, r, "", err)
		return
	}
	s.note(r, p)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "3")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		io.WriteString(w, "{}\n")
	}
}

func (s *Server) authFailed(w http.ResponseWriter, r *http.Request, scope string, err error) {
	reason := "invalid"
	if errors.Is(err, ErrNoAuth) {
		reason = "missing"
	}
	s.metrics.authFailure(reason)
	if info := infoFrom(r.Context()); info != nil && reason == "invalid" {
		info.err = &Error{Status: http.StatusUnauthorized, Code: CodeUnauthorized, Message: "authentication failed", Cause: err}
	}
	s.auth.Challenge(w, r, scope, err)
}

// note records the principal in the request log.
func (s *Server) note(r *http.Request, p *Principal) {
	if info := infoFrom(r.Context()); info != nil && p != nil {
		info.project, info.tokenID = p.Project, p.TokenID
	}
}

// actionOf is the access a request needs.
func actionOf(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead:
		return "pull"
	}
	return "push"
}

func scopeFor(name, action string) string {
	if action == "push" {
		return "repository:" + name + ":pull,push"
	}
	return "repository:" + name + ":pull"
}

// allowedMethods lists the methods each route serves.
var allowedMethods = map[routeKind][]string{
	routeManifest:    {http.MethodGet, http.MethodHead, http.MethodPut},
	routeBlob:        {http.MethodGet, http.MethodHead},
	routeUploadStart: {http.MethodPost},
	routeUpload:      {http.MethodGet, http.MethodPatch, http.MethodPut, http.MethodDelete},
	routeTags:        {http.MethodGet, http.MethodHead},
	routeReferrers:   {http.MethodGet, http.MethodHead},
}

// registryAPI serves /v2/<name>/...: parse, authenticate, authorize, map
// through the allowlist, dispatch.
func (s *Server) registryAPI(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	rt, perr := parseRoute(r, r.Host)
	if perr != nil {
		WriteError(w, r, perr)
		return
	}
	if info := infoFrom(r.Context()); info != nil {
		info.rt = rt
	}
	if !methodAllowed(rt.kind, r.Method) {
		w.Header().Set("Allow", strings.Join(allowedMethods[rt.kind], ", "))
		WriteError(w, r, newError(http.StatusMethodNotAllowed, CodeUnsupported, "%s is not supported on %s through this proxy", sanitizeMethod(r.Method), rt.kind))
		return
	}
	action := actionOf(r.Method)
	if rt.kind == routeUpload || rt.kind == routeUploadStart {
		action = "push" // an upload's status (GET) is part of pushing
	}
	scope := scopeFor(rt.name, action)
	p, err := s.auth.Authenticate(r)
	if err != nil {
		s.authFailed(w, r, scope, err)
		return
	}
	s.note(r, p)
	// The allowlist first: an upstream the project cannot reach is refused
	// with a message saying so, whatever the token.
	t, terr := s.target(r.Context(), p, rt)
	if terr != nil {
		s.metrics.authFailure("forbidden")
		WriteError(w, r, terr)
		return
	}
	if !s.authorize(w, r, p, rt.name, action, scope) {
		return
	}
	if info := infoFrom(r.Context()); info != nil {
		info.upstream, info.repo = t.Upstream, t.Repo
		if rt.digest.Hex != "" {
			info.digest = rt.digest.String()
		}
	}
	switch rt.kind {
	case routeManifest:
		if r.Method == http.MethodPut {
			s.putManifest(w, r, rt, t)
			return
		}
		s.serveManifest(w, r, rt, t)
	case routeBlob:
		s.serveBlob(w, r, rt, t)
	case routeTags:
		s.serveTags(w, r, rt, t)
	case routeReferrers:
		s.serveReferrers(w, r, rt, t)
	case routeUploadStart:
		s.startUpload(w, r, p, rt, t)
	case routeUpload:
		s.continueUpload(w, r, p, rt, t)
	}
}

func methodAllowed(k routeKind, m string) bool {
	for _, a := range allowedMethods[k] {
		if a == m {
			return true
		}
	}
	return false
}

// authorize checks that p may perform action on name. A bearer token that
// lacks the grant, when the project token could get it, is answered 401
// with the challenge (the client fetches a token with the right scope);
// anything the project token itself may not do is 403 DENIED.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, p *Principal, name, action, scope string) bool {
	if s.auth.Allows(p, name, action) {
		return true
	}
	if p.Access != nil {
		q := *p
		q.Access = nil
		if len(p.Scopes) == 0 || s.auth.Allows(&q, name, action) {
			s.metrics.authFailure("insufficient_scope")
			s.auth.Challenge(w, r, scope, ErrInsufficientScope)
			return false
		}
	}
	s.metrics.authFailure("forbidden")
	WriteError(w, r, newError(http.StatusForbidden, CodeDenied, "this token of project %s may not %s %s", p.Project, action, printableName(name)))
	return false
}

// acceptList is the client's Accept header as a list of media types.
func acceptList(r *http.Request) []string {
	var out []string
	for _, v := range r.Header.Values("Accept") {
		for _, part := range strings.Split(v, ",") {
			mt, _, _ := strings.Cut(part, ";")
			mt = strings.TrimSpace(mt)
			if mt == "" || mt == "*/*" || len(mt) > 255 || strings.ContainsAny(mt, "\r\n") {
				continue
			}
			out = append(out, mt)
			if len(out) >= 32 {
				return out
			}
		}
	}
	return out
}

func (s *Server) serveManifest(w http.ResponseWriter, r *http.Request, rt *route, t Target) {
	m, err := s.fetch.Manifest(r.Context(), t, rt.ref, ManifestRequest{Head: r.Method == http.MethodHead, Accept: acceptList(r)})
	if err != nil {
		s.countMismatch(t, err)
		WriteError(w, r, err)
		return
	}
	if info := infoFrom(r.Context()); info != nil {
		info.digest = m.Digest.String()
	}
	h := w.Header()
	if m.MediaType != "" {
		h.Set("Content-Type", m.MediaType)
	}
	h.Set("Docker-Content-Digest", m.Digest.String())
	h.Set("Etag", `"`+m.Digest.String()+`"`)
	h.Set("Content-Length", strconv.FormatInt(m.Size, 10))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(m.Body)
	}
}

func (s *Server) countMismatch(t Target, err error) {
	var e *Error
	if errors.As(err, &e) && e.Code == CodeManifestInvalid && strings.Contains(e.Message, "digest") {
		s.metrics.verifyFail.WithLabelValues(t.Upstream).Inc()
	}
}

func (s *Server) serveBlob(w http.ResponseWriter, r *http.Request, rt *route, t Target) {
	req := BlobRequest{Head: r.Method == http.MethodHead, Raw: !s.cfg.VerifyBlobs}
	if h := r.Header.Get("Range"); h != "" {
		if rng, ok := ParseRange(h); ok {
			req.Range = &rng
		}
	}
	b, err := s.fetch.Blob(r.Context(), t, rt.digest, req)
	if err != nil {
		WriteError(w, r, err)
		return
	}
	if b.Body != nil {
		defer b.Body.Close()
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", rt.digest.String())
	h.Set("Etag", `"`+rt.digest.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Cache-Control", "max-age=31536000")
	if b.Length >= 0 {
		h.Set("Content-Length", strconv.FormatInt(b.Length, 10))
	}
	status := http.StatusOK
	if b.Partial != nil {
		status = http.StatusPartialContent
		h.Set("Content-Range", b.Partial.String())
	}
	if req.Head || b.Body == nil {
		w.WriteHeader(status)
		return
	}
	cb, fromCache := b.Body.(*cachedBody)
	if fromCache && cb.hit() {
		// A committed, verified cache entry: let the kernel copy it.
		w.WriteHeader(status)
		// On an error the body falls short of its Content-Length and
		// net/http closes the connection: never a clean end.
		io.Copy(w, cb.Reader)
		return
	}
	// Read the first chunk before committing the status: a small blob
	// that fails verification still gets a proper error.
	body := &firstChunk{r: b.Body}
	if err := body.prime(); err != nil {
		WriteError(w, r, s.blobReadError(t, err))
		return
	}
	w.WriteHeader(status)
	n, rerr, werr := copyStream(w, body)
	if info := infoFrom(r.Context()); info != nil && !fromCache {
		info.upstreamBytes = n
	}
	switch {
	case werr != nil:
		// The client went away; its context is canceled, and with it the
		// upstream request.
		return
	case rerr != nil:
		e := s.blobReadError(t, rerr)
		e.Message += "; the response was aborted"
		if info := infoFrom(r.Context()); info != nil {
			info.err = e
		}
		// Headers are out: abort the connection so the client sees a
		// failed transfer, never a clean end of a bad body.
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) serveTags(w http.ResponseWriter, r *http.Request, rt *route, t Target) {
	q := r.URL.Query()
	var tq TagQuery
	if n := q.Get("n"); n != "" {
		v, err := strconv.Atoi(n)
		if err != nil || v < 0 || v > 100000 {
			WriteError(w, r, newError(http.StatusBadRequest, "PAGINATION_NUMBER_INVALID", "n must be a number between 0 and 100000"))
			return
		}
		tq.N = v
	}
	if last := q.Get("last"); last != "" {
		if len(last) > 256 {
			WriteError(w, r, newError(http.StatusBadRequest, "TAG_INVALID", "last is too long"))
			return
		}
		tq.Last = last
	}
	list, err := s.fetch.Tags(r.Context(), t, tq)
	if err != nil {
		WriteError(w, r, err)
		return
	}
	body, _ := json.Marshal(struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{rt.name, list.Tags})
	if list.Next != nil {
		nq := url.Values{}
		if list.Next.N > 0 {
			nq.Set("n", strconv.Itoa(list.Next.N))
		}
		nq.Set("last", list.Next.Last)
		if rt.ns {
			nq.Set("ns", rt.key)
		}
		w.Header().Set("Link", fmt.Sprintf(`</v2/%s/tags/list?%s>; rel="next"`, rt.path, nq.Encode()))
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(append(body, '\n'))
	}
}

func (s *Server) serveReferrers(w http.ResponseWriter, r *http.Request, rt *route, t Target) {
	at := r.URL.Query().Get("artifactType")
	if len(at) > 255 || strings.ContainsAny(at, "\r\n") {
		WriteError(w, r, newError(http.StatusBadRequest, CodeUnsupported, "invalid artifactType"))
		return
	}
	ref, err := s.fetch.Referrers(r.Context(), t, rt.digest, at)
	if err != nil {
		WriteError(w, r, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", ref.MediaType)
	if ref.FiltersApplied != "" {
		h.Set("OCI-Filters-Applied", ref.FiltersApplied)
	}
	h.Set("Content-Length", strconv.Itoa(len(ref.Body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(ref.Body)
	}
}

// blobReadError describes a failure reading a blob from the upstream.
func (s *Server) blobReadError(t Target, err error) *Error {
	if errors.Is(err, ErrDigestMismatch) {
		s.metrics.verifyFail.WithLabelValues(t.Upstream).Inc()
		return newError(http.StatusBadGateway, CodeBlobUnknown, "upstream %s sent a blob that does not match its digest", t.Upstream).withCause(err)
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return mapTransportError(t, err, true)
}
