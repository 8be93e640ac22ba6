package main

// cache warm: pre-fetch images into the proxy's content cache by pulling
// them through the proxy itself. The command builds the server 'serve'
// builds — same config file, same sealed store, same cache, same caching
// fetcher — and sends it registry API requests over in-memory connections,
// authenticated as the operator acting for one project. Everything a
// proxied pull does therefore happens: routing through the project's
// allowlist, the pull secret resolved now, host-bound upstream auth, the
// private-address guard, the coalesced verified fill, the location and
// access records.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/secret"
	"golang.org/x/sync/errgroup"
)

const cacheWarmUsage = `Usage: pullsecret cache warm [--project P] [--platform OS/ARCH[/VARIANT]]... [--config FILE] IMAGE...

Pre-fetch images into the proxy's content cache: the image index or
manifest, and every config and layer blob, of all the platforms of an
index, or only of the --platform ones (a single-platform image is warmed
whole). A pull of the image through 'pullsecret serve' is then served from
the cache.

IMAGE is a reference such as registry.example.com:5000/team/app:1.0 or
ghcr.io/acme/app@sha256:...; its registry must be covered by a pull secret
of project P, or be an alias of the configuration (alias/team/app:1.0).
The image is pulled through the proxy's own code, as a pull of project P:
the pull secret is resolved now and sent only to its registry, private
addresses are refused unless allow_private_upstreams allows them, every
blob is verified before it is cached, and P's access to each repository
is recorded. Safe to run while 'pullsecret serve' runs on the same cache.

On a terminal, standard error shows a progress bar per blob. Otherwise a
line is printed as each manifest and blob is done, and a summary at the end:
  warm IMAGE DIGEST SIZE cached|already cached

Flags:
  --project P                   project whose pull secret is used
                                (default: $PULLSECRET_PROJECT, else "default")
  --platform OS/ARCH[/VARIANT]  warm only this platform of an index
                                (repeatable; default: every platform)
  --config FILE                 the 'serve' config file: cache root,
                                aliases, allow_private_upstreams, upstream
  --log-level LEVEL             debug, info, warn or error (default warn)
  --home DIR                    data folder (default: $PULLSECRET_HOME)
`

const (
	// warmJobs is how many blobs of an image are fetched at once.
	warmJobs = 4
	// commitWait bounds the wait for verified content to become a cache
	// entry (an fsync and a rename) once its last byte was read.
	commitWait = 2 * time.Minute
	// warmHost is the in-process proxy's host name in request URLs; it
	// never reaches a resolver (see pipeListener).
	warmHost = "pullsecret-warm.invalid"
)

// manifestAccept are the manifest media types a warm-up asks for.
var manifestAccept = strings.Join([]string{
	string(types.OCIImageIndex), string(types.OCIManifestSchema1),
	string(types.DockerManifestList), string(types.DockerManifestSchema2),
}, ", ")

func (c *cli) cacheWarm(args []string) (err error) {
	fs := newFlagSet("warm")
	co := c.commonFlags(fs)
	var cfgFile, logLevel string
	var platforms stringList
	fs.StringVar(&cfgFile, "config", "", "")
	fs.StringVar(&logLevel, "log-level", "warn", "")
	fs.Var(&platforms, "platform", "")
	pos, err := c.parseFlags(fs, args, cacheWarmUsage)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return &usageError{msg: "name at least one IMAGE", usage: cacheWarmUsage}
	}
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, logLevel) {
		return &usageError{msg: fmt.Sprintf("--log-level: unknown level %q", printable(logLevel)), usage: cacheWarmUsage}
	}
	specs, err := parsePlatforms(platforms)
	if err != nil {
		return &usageError{msg: "--platform: " + err.Error(), usage: cacheWarmUsage}
	}
	project, err := c.projectName(co)
	if err != nil {
		return err
	}
	cfg := proxy.DefaultConfig()
	if cfgFile != "" {
		if cfg, err = proxy.LoadConfig(cfgFile); err != nil {
			return err
		}
	}
	if co.home != "" {
		cfg.Home = co.home
	} else if c.home != "" {
		cfg.Home = c.home
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	if !cfg.Cache.Enabled {
		return errors.New("the cache is off (cache.enabled: false): there is nothing to warm")
	}
	aliases := projectAliases(cfg, project)
	images := make([]warmImage, 0, len(pos))
	for _, arg := range pos {
		img, err := parseWarmImage(arg, aliases)
		if err != nil {
			return err
		}
		images = append(images, img)
	}

	var show warmShow
	if isTerminal(c.stderr) {
		p := newProgress(c.stderr, termWidth(c.getenv))
		p.start()
		defer p.finish()
		show = &barShow{p: p}
	} else {
		show = &lineShow{w: c.stdout}
	}
	log := proxy.NewLogger(show.logWriter(c.stderr), proxy.LogConfig{Level: logLevel, Format: cfg.Log.Format})
	db, err := c.commandMetadata(cfg)
	if err != nil {
		return err
	}
	home, store, err := c.openServerStore(cfg, log, metadataStoreOptions(db)...)
	if err != nil {
		return err
	}
	if err := knownProject(c.ctx, store, cfg, project); err != nil {
		return err
	}
	auditLog, auditCloser, err := c.openAuditLog(cfg, home, db, log)
	if err != nil {
		return err
	}
	if auditLog != nil {
		auditLog = warmAudit{Log: auditLog, subject: warmSubject()}
	}
	w, err := c.newWarmer(cfg, home, store, project, specs, show, log, auditLog)
	if err != nil {
		if auditCloser != nil {
			auditCloser.Close()
		}
		return err
	}
	w.auditCloser = auditCloser
	if db != nil {
		w.access = db.AccessRecords()
	}
	defer func() {
		if cerr := w.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()

	var total warmStats
	var failed []string
	for _, img := range images {
		show.image(img.arg)
		st, err := w.warm(c.ctx, img)
		total.add(st)
		if err != nil {
			if len(images) == 1 || c.ctx.Err() != nil {
				return err
			}
			// Go on with the others; each failure is reported as it happens.
			failed = append(failed, img.arg)
			show.failure(c.stderr, err)
			continue
		}
		total.images++
	}
	show.summary(c.stdout, total)
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d images could not be warmed: %s", len(failed), len(images), strings.Join(failed, ", "))
	}
	return nil
}

// parsePlatforms reads --platform values: OS/ARCH[/VARIANT].
func parsePlatforms(list []string) ([]v1.Platform, error) {
	var out []v1.Platform
	for _, s := range list {
		p, err := v1.ParsePlatform(s)
		if err != nil || p.OS == "" || p.Architecture == "" {
			return nil, fmt.Errorf("%q is not OS/ARCH[/VARIANT] (e.g. linux/amd64, linux/arm/v7)", printable(s))
		}
		out = append(out, *p)
	}
	return out, nil
}

// projectAliases are the aliases project may use: the global ones and its
// own, which win.
func projectAliases(cfg proxy.Config, project string) map[string]string {
	out := map[string]string{}
	for k, v := range cfg.Aliases {
		out[k] = v
	}
	if pc, ok := cfg.Projects[project]; ok {
		for k, v := range pc.Aliases {
			out[k] = v
		}
	}
	return out
}

// knownProject fails for a project with neither a pull secret nor a
// section in the config: a typo, most likely.
func knownProject(ctx context.Context, store *secret.Store, cfg proxy.Config, project string) error {
	secs, err := store.List(ctx, project)
	if err != nil {
		return err
	}
	if _, ok := cfg.Projects[project]; ok || len(secs) > 0 {
		return nil
	}
	return fmt.Errorf("unknown project %q: it has no pull secrets (see 'pullsecret secret list --project %s')", project, project)
}

// warmImage is an IMAGE argument mapped to the proxy's path-prefix form.
type warmImage struct {
	arg      string // as given
	key      string // first path component on the proxy: registry host or alias
	upstream string // the registry host, for the cache's tag index
	repo     string // repository on the registry
	ref      string // tag or digest
}

func parseWarmImage(arg string, aliases map[string]string) (warmImage, error) {
	img := warmImage{arg: arg}
	parse := arg
	if first, rest, ok := strings.Cut(arg, "/"); ok {
		if host, isAlias := aliases[first]; isAlias {
			img.key, parse = first, host+"/"+rest
		}
	}
	ref, err := name.ParseReference(parse)
	if err != nil {
		return img, fmt.Errorf("%s: not an image reference: %w", printable(arg), err)
	}
	img.repo, img.ref = ref.Context().RepositoryStr(), ref.Identifier()
	reg := ref.Context().RegistryStr()
	if img.key == "" {
		img.key = reg
	}
	img.upstream = reg
	if t, err := secret.ParseServerURL(reg); err == nil {
		img.upstream = t.Host // index.docker.io is docker.io, as for the proxy
	}
	return img, nil
}

// path is the proxy's API path of what under the image's repository.
func (img warmImage) path(what string) string {
	return "/v2/" + img.key + "/" + img.repo + "/" + what
}

// warmAuth authenticates every in-process request as a pull of one
// project. The operator running the command holds the data folder, and
// with it the sealed store; no project token is involved. Which upstreams
// and repositories the project may reach is still the server's decision
// (its allowlist), made before Allows is asked.
type warmAuth struct{ project string }

func (a warmAuth) Authenticate(*http.Request) (*proxy.Principal, error) {
	return &proxy.Principal{Project: a.project, Scopes: []string{proxy.ScopePull}}, nil
}

func (a warmAuth) Allows(p *proxy.Principal, _, action string) bool {
	return p != nil && p.Project == a.project && action == "pull"
}

func (a warmAuth) Challenge(w http.ResponseWriter, r *http.Request, _ string, _ error) {
	proxy.WriteError(w, r, &proxy.Error{Status: http.StatusForbidden, Code: proxy.CodeDenied, Message: "cache warm only pulls"})
}

// warmAudit records the warm-up's pulls as the operator's, not as a
// client's: there is no token and no network peer, only who ran it.
type warmAudit struct {
	audit.Log
	subject string
}

func (a warmAudit) Record(ctx context.Context, e audit.Event) error {
	e.Via, e.Subject, e.Client = audit.ViaWarm, a.subject, ""
	return a.Log.Record(ctx, e)
}

// warmSubject names who runs the command: the OS user and host.
func warmSubject() string {
	s := "pullsecret cache warm"
	who := ""
	if u, err := user.Current(); err == nil {
		who = u.Username
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		who += "@" + h
	}
	if who != "" {
		s += " by " + who
	}
	return s
}

// pipeListener hands the server in-memory connections (net.Pipe) that
// only this process can dial: requests go through the very http.Server a
// proxied pull goes through, yet no socket is opened that anyone else could
// use with the operator's authority.
type pipeListener struct {
	conns     chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

// dial is the client transport's DialContext.
func (l *pipeListener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	server, client := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
	case <-ctx.Done():
	}
	server.Close()
	client.Close()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return nil, net.ErrClosed
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "in-process" }

// warmRecords are the access records of one warm-up: in memory and empty
// at the start, so that the project proves its access to every repository
// upstream with its own credential (a warm-up checks the credential rather
// than trusting an earlier record). What it proved or revoked is merged
// into <home>/access.json at the end — the file is read again then, so
// records a running server wrote meanwhile are kept — for the servers
// started afterwards.
type warmRecords struct {
	*cache.MemoryAccessRecords
	mu      sync.Mutex
	changes map[cache.AccessKey]accessChange
}

type accessChange struct {
	at     time.Time
	revoke bool
}

func newWarmRecords() *warmRecords {
	return &warmRecords{MemoryAccessRecords: cache.NewAccessRecords(), changes: map[cache.AccessKey]accessChange{}}
}

func (r *warmRecords) Record(ctx context.Context, k cache.AccessKey, at time.Time) error {
	if err := r.MemoryAccessRecords.Record(ctx, k, at); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.changes[k] = accessChange{at: at}
	return nil
}

func (r *warmRecords) Revoke(ctx context.Context, k cache.AccessKey) error {
	r.mu.Lock()
	r.changes[k] = accessChange{revoke: true}
	r.mu.Unlock()
	return r.MemoryAccessRecords.Revoke(ctx, k)
}

// accessStore is where persist merges the changes: the access records
// file, or the metadata database's.
type accessStore interface {
	Record(ctx context.Context, k cache.AccessKey, at time.Time) error
	Revoke(ctx context.Context, k cache.AccessKey) error
}

// persist merges the changes into the access records file.
func (r *warmRecords) persist(path string) error {
	return r.persistTo(context.Background(), nil, path)
}

// persistTo merges the changes into the access records of db when it is
// not nil (metadata driver postgres), else into the file at path.
func (r *warmRecords) persistTo(ctx context.Context, db accessStore, path string) error {
	r.mu.Lock()
	changes := r.changes
	r.changes = map[cache.AccessKey]accessChange{}
	r.mu.Unlock()
	if len(changes) == 0 {
		return nil
	}
	merge := func(m accessStore) (err error) {
		for k, ch := range changes {
			if ch.revoke {
				err = errors.Join(err, m.Revoke(ctx, k))
			} else {
				err = errors.Join(err, m.Record(ctx, k, ch.at))
			}
		}
		return err
	}
	if db != nil {
		return merge(db)
	}
	m, err := cache.OpenAccessRecords(path)
	if err != nil {
		return err
	}
	return errors.Join(merge(m), m.Close())
}

// warmer is the in-process proxy and its client.
type warmer struct {
	home    string
	cache   *cache.Cache
	records *warmRecords
	// access is the metadata database's access records (nil: access.json).
	access      accessStore
	client      *http.Client
	maxManifest int64
	platforms   []v1.Platform
	show        warmShow
	stopServer  func() error
	// auditCloser flushes the audit trail (nil: none), after the server.
	auditCloser io.Closer
}

func (c *cli) newWarmer(cfg proxy.Config, home string, store *secret.Store, project string, platforms []v1.Platform, show warmShow, log *slog.Logger, al audit.Log) (*warmer, error) {
	reg := prometheus.NewRegistry()
	cc, err := openContentCache(c.ctx, cfg, home, reg, log)
	if err != nil {
		return nil, err
	}
	records := newWarmRecords()
	// The in-process server listens on no network: its TLS settings are
	// the network listener's business.
	cfg.TLSCert, cfg.TLSKey = "", ""
	srv, err := proxy.New(cfg, store, warmAuth{project: project}, proxy.WithLogger(log), proxy.WithAudit(al),
		proxy.WithMetricsRegistry(reg), withCachedFetcher(cfg, cc, records, reg, log))
	if err != nil {
		cc.Close()
		return nil, err
	}
	ln := newPipeListener()
	sctx, cancel := context.WithCancel(context.WithoutCancel(c.ctx))
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx, ln) }()
	tr := &http.Transport{
		DialContext:         ln.dial,
		DisableCompression:  true,
		MaxIdleConnsPerHost: warmJobs + 1,
	}
	w := &warmer{
		home:    home,
		cache:   cc,
		records: records,
		client: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		}},
		maxManifest: int64(cfg.MaxManifestSize),
		platforms:   platforms,
		show:        show,
	}
	w.stopServer = func() error {
		tr.CloseIdleConnections()
		cancel()
		if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
	return w, nil
}

// close stops the server, closes the cache (which waits for fills still
// committing) and merges the access records.
func (w *warmer) close() error {
	err := w.stopServer()
	if w.auditCloser != nil {
		err = errors.Join(err, w.auditCloser.Close())
	}
	err = errors.Join(err, w.cache.Close())
	if perr := w.records.persistTo(context.Background(), w.access, filepath.Join(w.home, "access.json")); perr != nil {
		err = errors.Join(err, fmt.Errorf("access records: %w", perr))
	}
	return err
}

// warmStats count what a warm-up did.
type warmStats struct {
	images           int
	manifests, blobs int
	cached, already  int
	cachedBytes      int64
}

func (s *warmStats) add(o warmStats) {
	s.images += o.images
	s.manifests += o.manifests
	s.blobs += o.blobs
	s.cached += o.cached
	s.already += o.already
	s.cachedBytes += o.cachedBytes
}

func (s *warmStats) count(manifest, already bool, size int64) {
	if manifest {
		s.manifests++
	} else {
		s.blobs++
	}
	if already {
		s.already++
	} else {
		s.cached++
		s.cachedBytes += size
	}
}

// fetchedManifest is a manifest read through the proxy.
type fetchedManifest struct {
	digest    v1.Hash
	mediaType types.MediaType
	body      []byte
}

// warm pulls one image through the proxy.
func (w *warmer) warm(ctx context.Context, img warmImage) (warmStats, error) {
	var st warmStats
	root, err := w.manifest(ctx, img, img.ref, &st)
	if err != nil {
		return st, rootError(img, err)
	}
	seen := map[v1.Hash]bool{root.digest: true}
	var blobs []v1.Descriptor
	if err := w.walk(ctx, img, root, seen, &blobs, &st); err != nil {
		return st, fmt.Errorf("warm %s: %w", img.arg, err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(warmJobs)
	var mu sync.Mutex
	for _, d := range blobs {
		g.Go(func() error {
			already, err := w.blob(gctx, img, d)
			if err != nil {
				return fmt.Errorf("warm %s: blob %s: %w", img.arg, d.Digest, err)
			}
			mu.Lock()
			st.count(false, already, d.Size)
			mu.Unlock()
			return nil
		})
	}
	return st, g.Wait()
}

// rootError words the failures of the first request, which are the
// user's mistakes more often than not.
func rootError(img warmImage, err error) error {
	var pe *proxyError
	if errors.As(err, &pe) && pe.status == http.StatusNotFound && pe.code == proxy.CodeManifestUnknown {
		what := fmt.Sprintf("tag %q", img.ref)
		if strings.Contains(img.ref, ":") {
			what = "manifest " + img.ref
		}
		return fmt.Errorf("warm %s: %s not found (%s)", img.arg, what, pe.msg)
	}
	return fmt.Errorf("warm %s: %w", img.arg, err)
}

// walk collects the blobs of m, fetching the manifests of an index that
// match the platforms.
func (w *warmer) walk(ctx context.Context, img warmImage, m *fetchedManifest, seen map[v1.Hash]bool, blobs *[]v1.Descriptor, st *warmStats) error {
	switch {
	case m.mediaType.IsIndex():
		idx, err := v1.ParseIndexManifest(bytes.NewReader(m.body))
		if err != nil {
			return fmt.Errorf("index %s: %w", m.digest, err)
		}
		matched := 0
		for _, d := range idx.Manifests {
			if !d.MediaType.IsIndex() && !w.wanted(d.Platform) {
				continue
			}
			matched++
			if seen[d.Digest] {
				continue
			}
			seen[d.Digest] = true
			child, err := w.manifest(ctx, img, d.Digest.String(), st)
			if err != nil {
				return fmt.Errorf("manifest %s: %w", d.Digest, err)
			}
			if err := w.walk(ctx, img, child, seen, blobs, st); err != nil {
				return err
			}
		}
		if matched == 0 && len(w.platforms) > 0 {
			return fmt.Errorf("no manifest for %s in index %s (it has %s)", platformList(w.platforms), m.digest, indexPlatforms(idx))
		}
		return nil
	}
	man, err := v1.ParseManifest(bytes.NewReader(m.body))
	if err != nil {
		return fmt.Errorf("manifest %s (%s): %w", m.digest, m.mediaType, err)
	}
	for _, d := range append([]v1.Descriptor{man.Config}, man.Layers...) {
		// Non-distributable layers live at their URLs, not in the
		// registry; a pull fetches them from there.
		if d.Digest.Hex == "" || !d.MediaType.IsDistributable() || seen[d.Digest] {
			continue
		}
		seen[d.Digest] = true
		*blobs = append(*blobs, d)
	}
	return nil
}

// wanted reports whether a manifest of an index is for a --platform.
func (w *warmer) wanted(p *v1.Platform) bool {
	if len(w.platforms) == 0 {
		return true
	}
	if p == nil {
		return false
	}
	for _, spec := range w.platforms {
		if p.Satisfies(spec) {
			return true
		}
	}
	return false
}

func platformList(ps []v1.Platform) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

func indexPlatforms(idx *v1.IndexManifest) string {
	var s []string
	for _, d := range idx.Manifests {
		if d.Platform != nil && !slices.Contains(s, d.Platform.String()) {
			s = append(s, d.Platform.String())
		}
	}
	if len(s) == 0 {
		return "no platforms"
	}
	return strings.Join(s, ", ")
}

// committed reports whether the cache holds a verified entry for d.
func (w *warmer) committed(ctx context.Context, kind cache.Kind, d v1.Hash) bool {
	_, err := w.cache.Stat(ctx, kind, digest.Digest(d.String()))
	return err == nil
}

// waitCommitted waits for a fill that was read to its end to become a
// cache entry: the cache commits it after releasing the last byte.
func (w *warmer) waitCommitted(ctx context.Context, kind cache.Kind, d v1.Hash) error {
	deadline := time.Now().Add(commitWait)
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 200*time.Millisecond) {
		if w.committed(ctx, kind, d) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("verified, but not stored in the cache after %s (see the log)", commitWait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
	}
}

// manifest fetches a manifest by tag or digest through the proxy.
func (w *warmer) manifest(ctx context.Context, img warmImage, ref string, st *warmStats) (*fetchedManifest, error) {
	// What the cache holds now, to tell "cached" from "already cached":
	// the digest itself, or the digest the tag had when last seen.
	var before v1.Hash
	if strings.Contains(ref, ":") {
		before, _ = v1.NewHash(ref)
	} else if desc, err := w.cache.Tag(ctx, cache.TagKey{Upstream: img.upstream, Repo: img.repo, Tag: ref}); err == nil {
		before, _ = v1.NewHash(desc.Digest.String())
	}
	already := before.Hex != "" && w.committed(ctx, cache.KindManifest, before)

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+warmHost+img.path("manifests/"+ref), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := w.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, readProxyError(resp)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, w.maxManifest+1))
	if err != nil {
		return nil, err
	}
	if int64(len(body)) > w.maxManifest {
		return nil, fmt.Errorf("manifest larger than max_manifest_size (%d bytes)", w.maxManifest)
	}
	got, _, err := v1.SHA256(bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	want := resp.Header.Get("Docker-Content-Digest")
	if strings.Contains(ref, ":") {
		want = ref
	}
	if want != got.String() {
		return nil, fmt.Errorf("the proxy sent a manifest whose digest %s is not %s", got, want)
	}
	m := &fetchedManifest{digest: got, mediaType: manifestType(resp.Header.Get("Content-Type"), body), body: body}
	if !m.mediaType.IsIndex() && !m.mediaType.IsImage() {
		return nil, fmt.Errorf("manifest %s: media type %q is not an image or an index", got, printable(string(m.mediaType)))
	}
	item := w.show.item(img.arg, got, int64(len(body)))
	item.add(int64(len(body)))
	already = already && got == before
	if !already {
		if err := w.waitCommitted(ctx, cache.KindManifest, got); err != nil {
			item.fail(err)
			return nil, fmt.Errorf("manifest %s: %w", got, err)
		}
	}
	item.done(already)
	st.count(true, already, int64(len(body)))
	return m, nil
}

// manifestType is the Content-Type, or the mediaType field when the
// registry served a generic type.
func manifestType(ct string, body []byte) types.MediaType {
	ct, _, _ = strings.Cut(ct, ";")
	mt := types.MediaType(strings.TrimSpace(ct))
	if mt.IsIndex() || mt.IsImage() || mt.IsSchema1() {
		return mt
	}
	var probe struct {
		MediaType types.MediaType `json:"mediaType"`
		Manifests []any           `json:"manifests"`
	}
	if err := json.Unmarshal(body, &probe); err == nil {
		switch {
		case probe.MediaType != "":
			return probe.MediaType
		case probe.Manifests != nil:
			return types.OCIImageIndex
		}
	}
	return mt
}

// blob makes sure the cache holds d, fetched through the proxy, and
// reports whether it already did.
func (w *warmer) blob(ctx context.Context, img warmImage, d v1.Descriptor) (bool, error) {
	path := "http://" + warmHost + img.path("blobs/"+d.Digest.String())
	if w.committed(ctx, cache.KindBlob, d.Digest) {
		// Cached: a HEAD is enough to prove the project's access and the
		// blob's location in this repository, without reading it again.
		req, err := http.NewRequestWithContext(ctx, http.MethodHead, path, nil)
		if err != nil {
			return false, err
		}
		resp, err := w.client.Do(req)
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && w.committed(ctx, cache.KindBlob, d.Digest) {
			item := w.show.item(img.arg, d.Digest, d.Size)
			item.add(d.Size)
			item.done(true)
			return true, nil
		}
		// Gone meanwhile, or refused: the GET fetches it or says why.
	}
	item := w.show.item(img.arg, d.Digest, d.Size)
	if err := w.getBlob(ctx, path, d, item); err != nil {
		item.fail(err)
		return false, err
	}
	if err := w.waitCommitted(ctx, cache.KindBlob, d.Digest); err != nil {
		item.fail(err)
		return false, err
	}
	item.done(false)
	return false, nil
}

// getBlob reads a blob through the proxy, checking its size and digest:
// the proxy verifies what it caches, this verifies what it was told.
func (w *warmer) getBlob(ctx context.Context, path string, d v1.Descriptor, item warmItem) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return readProxyError(resp)
	}
	h, err := v1.Hasher(d.Digest.Algorithm)
	if err != nil {
		return err
	}
	buf := make([]byte, 256<<10)
	var n int64
	for {
		k, rerr := resp.Body.Read(buf)
		if k > 0 {
			h.Write(buf[:k])
			n += int64(k)
			item.add(int64(k))
			if n > d.Size {
				return fmt.Errorf("the proxy sent more than the %d bytes of the descriptor", d.Size)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return fmt.Errorf("transfer failed after %d bytes: %w", n, rerr)
		}
	}
	if n != d.Size {
		return fmt.Errorf("the proxy sent %d bytes, the descriptor says %d", n, d.Size)
	}
	if got := fmt.Sprintf("%x", h.Sum(nil)); got != d.Digest.Hex {
		return fmt.Errorf("the bytes received hash to %s:%s", d.Digest.Algorithm, got)
	}
	return nil
}

// proxyError is a registry error the in-process proxy answered. Its
// messages are the proxy's own, which never quote upstream text or a
// credential: they are shown as they are.
type proxyError struct {
	status int
	code   string
	msg    string
}

func (e *proxyError) Error() string { return e.msg }

func readProxyError(resp *http.Response) error {
	e := &proxyError{status: resp.StatusCode, msg: fmt.Sprintf("the proxy answered %d", resp.StatusCode)}
	var te *transport.Error
	if errors.As(transport.CheckError(resp, http.StatusOK), &te) && len(te.Errors) > 0 {
		e.code = string(te.Errors[0].Code)
		msgs := make([]string, 0, len(te.Errors))
		for _, d := range te.Errors {
			if d.Message != "" {
				msgs = append(msgs, d.Message)
			}
		}
		if len(msgs) > 0 {
			e.msg = strings.Join(msgs, "; ")
		}
	}
	return e
}

// barLabel is "sha256:" and the first 12 hex digits of d.
func barLabel(d v1.Hash) string {
	h := d.Hex
	if len(h) > 12 {
		h = h[:12]
	}
	return d.Algorithm + ":" + h
}

// warmShow is how a warm-up shows what it does.
type warmShow interface {
	// image announces an image.
	image(arg string)
	// item starts showing one manifest or blob.
	item(image string, d v1.Hash, size int64) warmItem
	// failure reports an image that failed when others go on.
	failure(stderr io.Writer, err error)
	// summary prints the totals.
	summary(stdout io.Writer, st warmStats)
	// logWriter is where log lines go without spoiling the display.
	logWriter(stderr io.Writer) io.Writer
}

// warmItem is one manifest or blob being warmed.
type warmItem interface {
	add(n int64)
	done(already bool)
	fail(err error)
}

func itemStatus(already bool) string {
	if already {
		return "already cached"
	}
	return "cached"
}

func writeSummary(w io.Writer, st warmStats) {
	images := "images"
	if st.images == 1 {
		images = "image"
	}
	fmt.Fprintf(w, "warmed %d %s (%d manifests, %d blobs): %d cached (%s), %d already cached\n",
		st.images, images, st.manifests, st.blobs, st.cached, humanBytes(st.cachedBytes), st.already)
}

// lineShow prints a line per item as it completes: for logs and scripts.
type lineShow struct {
	mu sync.Mutex
	w  io.Writer
}

type lineItem struct {
	s     *lineShow
	image string
	d     v1.Hash
	size  int64
}

func (s *lineShow) image(string) {}

func (s *lineShow) item(image string, d v1.Hash, size int64) warmItem {
	return &lineItem{s: s, image: image, d: d, size: size}
}

func (s *lineShow) failure(stderr io.Writer, err error) {
	fmt.Fprintf(stderr, "pullsecret: %s\n", err)
}

func (s *lineShow) summary(stdout io.Writer, st warmStats) { writeSummary(stdout, st) }

func (s *lineShow) logWriter(stderr io.Writer) io.Writer { return stderr }

func (i *lineItem) add(int64) {}

func (i *lineItem) done(already bool) {
	i.s.mu.Lock()
	defer i.s.mu.Unlock()
	fmt.Fprintf(i.s.w, "warm %s %s %d %s\n", i.image, i.d, i.size, itemStatus(already))
}

func (i *lineItem) fail(error) {}

// barShow draws progress bars on a terminal (standard error); the summary
// still goes to standard output.
type barShow struct{ p *progress }

type barItem struct{ b *bar }

func (s *barShow) image(arg string) { s.p.line(fit(arg, s.p.width)) }

func (s *barShow) item(_ string, d v1.Hash, size int64) warmItem {
	return barItem{s.p.bar(barLabel(d), size)}
}

func (s *barShow) failure(_ io.Writer, err error) {
	s.p.line(fit("pullsecret: "+err.Error(), s.p.width))
}

func (s *barShow) summary(stdout io.Writer, st warmStats) {
	s.p.finish()
	writeSummary(stdout, st)
}

func (s *barShow) logWriter(io.Writer) io.Writer { return progressLog{s.p} }

func (i barItem) add(n int64)       { i.b.add(n) }
func (i barItem) done(already bool) { i.b.end(itemStatus(already)) }

func (i barItem) fail(err error) {
	if errors.Is(err, context.Canceled) {
		i.b.end("") // abandoned because another transfer failed
		return
	}
	i.b.end("failed")
}

// progressLog prints log lines above the bars.
type progressLog struct{ p *progress }

func (l progressLog) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		l.p.line(line)
	}
	return len(b), nil
}
