package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"

	// The peer stores what it proxies with the filesystem driver.
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

// Sizes and counts of the cache benchmark.
const (
	cacheBlobSize   = 256 << 20
	cacheWarmRounds = 5
	cacheColdRounds = 5
	cacheClients    = 20
	cacheConcRounds = 3
	// cacheClientBuf is each client's read buffer (io.Discard's own
	// ReadFrom reads 8 KiB at a time, which costs the shared cores more
	// syscalls than the servers being measured).
	cacheClientBuf = 256 << 10
	cacheRepo      = "bench/cache"
)

// cacheBench measures the proxy's content cache (issue 4) side by side with
// its baselines in one run, on a private upstream (in-process distribution
// v3, filesystem driver, htpasswd):
//
//   - warm: a 256 MiB blob served from the cache through the proxy vs
//     directly by the upstream (throughput ratio, median of rounds);
//   - cold, one client: through a proxy with an empty cache vs directly
//     (time ratio), with clients that discard and clients that verify;
//   - cold, 20 concurrent clients: the bytes the upstream sends and the wall
//     time, for the proxy and for distribution v3's own proxy mode (the
//     peer), with 20 direct clients as the reference;
//   - memory: the heap growth of the process while the 20 clients stream
//     through the proxy.
//
// The proxy is built as `pullsecret serve` builds it (proxy.New with the
// caching fetcher, cache.OpenFilesystem, access records); every cold round
// gets a fresh one with an empty cache in its own temporary folder.
func (b *bench) cacheBench(ctx context.Context) error {
	e, err := newCacheEnv(ctx)
	if err != nil {
		return err
	}
	defer e.close()
	stop, err := startCPUProfile(b.cacheProfile)
	if err != nil {
		return err
	}
	defer stop()

	direct := e.up.URL() + "/v2/" + cacheRepo + "/blobs/" + e.blob.String()
	// Warm-up: connections, the page cache of the upstream's file.
	for range 2 {
		if _, _, err := e.get(ctx, direct, e.upAuth, false, 0); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}

	// Goroutines started under a phase label keep it (CPU profiles by
	// phase and side).
	var warm, cold map[string]*series
	var conc map[string]*concResult
	pprof.Do(ctx, pprof.Labels("phase", "warm"), func(ctx context.Context) { warm, err = e.warm(ctx, direct) })
	if err != nil {
		return fmt.Errorf("warm: %w", err)
	}
	pprof.Do(ctx, pprof.Labels("phase", "cold"), func(ctx context.Context) { cold, err = e.cold(ctx, direct) })
	if err != nil {
		return fmt.Errorf("cold: %w", err)
	}
	pprof.Do(ctx, pprof.Labels("phase", "concurrent"), func(ctx context.Context) { conc, err = e.concurrent(ctx, direct) })
	if err != nil {
		return fmt.Errorf("%d clients: %w", cacheClients, err)
	}

	fmt.Printf("upstream: distribution v3, filesystem driver, htpasswd (private); proxy in-process as `serve` builds it (cache: filesystem driver in a temp dir); peer: distribution v3 proxy mode in-process (filesystem driver, upstream username/password)\n")
	fmt.Printf("blob: %d MiB random; warm %d rounds, cold %d rounds, %d clients %d rounds; interleaved, a fresh cold cache per cold round; median (min, max)\n",
		cacheBlobSize>>20, cacheWarmRounds, cacheColdRounds, cacheClients, cacheConcRounds)
	fmt.Printf("GOMAXPROCS %d; client, upstream, proxy and peer share this process and its cores (CPU: all of them, per GiB delivered)\n", runtime.GOMAXPROCS(0))
	for _, n := range []string{"direct", "proxy"} {
		v := warm[n]
		fmt.Printf("warm %-38s %7.0f MiB/s (min %5.0f, max %5.0f)  CPU %5.2f s/GiB\n", warmLabel[n], median(v.val), slices.Min(v.val), slices.Max(v.val), median(v.cpu))
	}
	for _, n := range coldNames {
		v := cold[n]
		fmt.Printf("cold %-38s %7.3f s    (min %.3f, max %.3f)  %6.0f MiB/s  CPU %5.2f s/GiB\n", coldLabel[n], median(v.val), slices.Min(v.val), slices.Max(v.val),
			float64(cacheBlobSize>>20)/median(v.val), median(v.cpu))
	}
	for _, n := range concNames {
		r := conc[n]
		fmt.Printf("%d clients %-33s wall %6.2f s (min %.2f, max %.2f)  upstream sent %5.2fx the blob (max %5.2fx)  heap growth %5.1f MiB (max)  RSS growth %5.1f MiB (max)\n",
			cacheClients, concLabel[n], median(r.wall), slices.Min(r.wall), slices.Max(r.wall),
			median(r.upstream), slices.Max(r.upstream), slices.Max(r.heap), slices.Max(r.rss))
	}

	fmt.Println("--")
	ratio := median(warm["proxy"].val) / median(warm["direct"].val)
	figure("warm: throughput proxy (cache hit) / direct", fmt.Sprintf("%.2fx", ratio), ">= 0.90x", ratio >= 0.9)
	ratio = median(cold["proxy"].val) / median(cold["direct"].val)
	figure("cold, 1 client: time proxy / direct", fmt.Sprintf("%.2fx", ratio), "<= 1.15x", ratio <= 1.15)
	ratio = median(cold["proxy-verify"].val) / median(cold["direct-verify"].val)
	figure("cold, 1 client that verifies: time proxy / direct", fmt.Sprintf("%.2fx", ratio), "<= 1.15x", ratio <= 1.15)
	ratio = median(cold["peer"].val) / median(cold["direct"].val)
	figure("cold, 1 client: time peer / direct", fmt.Sprintf("%.2fx", ratio), "peer", true)
	ratio = median(cold["sha256"].val) / median(cold["direct"].val)
	figure("cold floor: SHA-256 time / direct", fmt.Sprintf("%.2fx", ratio), "info", true)
	up := slices.Max(conc["proxy"].upstream)
	figure(fmt.Sprintf("cold, %d clients: upstream bytes, proxy (max)", cacheClients), fmt.Sprintf("%.2fx blob", up), "= 1x blob", up == 1)
	figure(fmt.Sprintf("cold, %d clients: upstream bytes, peer (median)", cacheClients), fmt.Sprintf("%.2fx blob", median(conc["peer"].upstream)), "peer", true)
	ratio = median(conc["proxy"].wall) / median(conc["peer"].wall)
	figure(fmt.Sprintf("cold, %d clients: wall time proxy / peer", cacheClients), fmt.Sprintf("%.2fx", ratio), "< 1x", ratio < 1)
	ratio = median(conc["proxy"].wall) / median(conc["direct"].wall)
	figure(fmt.Sprintf("cold, %d clients: wall time proxy / direct", cacheClients), fmt.Sprintf("%.2fx", ratio), "info", true)
	heap := slices.Max(conc["proxy"].heap)
	figure(fmt.Sprintf("memory: heap growth while %d clients stream (max)", cacheClients), fmt.Sprintf("%.1f MiB", heap), "< 64 MiB", heap < 64)
	return nil
}

// series is one path's measurements over the rounds: the value (MiB/s or
// seconds) and the CPU seconds the whole process spent per GiB delivered.
type series struct {
	val, cpu []float64
}

func (s *series) add(val float64, cpu time.Duration) {
	s.val = append(s.val, val)
	s.cpu = append(s.cpu, cpu.Seconds()/(float64(cacheBlobSize)/(1<<30)))
}

// figure prints one line of the summary table.
func figure(name, value, target string, ok bool) {
	verdict := "PASS"
	switch {
	case target == "peer" || target == "info":
		verdict = ""
	case !ok:
		verdict = "MISS"
	}
	fmt.Printf("%-54s %12s   (target %-9s) %s\n", name, value, target, verdict)
}

var (
	warmLabel = map[string]string{
		"direct": "direct (distribution, filesystem)",
		"proxy":  "proxy, served from the cache",
	}
	coldNames = []string{"direct", "direct-verify", "proxy", "proxy-verify", "peer", "sha256"}
	coldLabel = map[string]string{
		"direct":        "direct",
		"direct-verify": "direct, client verifies sha256",
		"proxy":         "proxy, empty cache",
		"proxy-verify":  "proxy, empty cache, client verifies",
		"peer":          "peer (distribution proxy), empty",
		"sha256":        "floor: SHA-256 of the size, in memory",
	}
	concNames = []string{"direct", "proxy", "peer"}
	concLabel = map[string]string{
		"direct": "direct",
		"proxy":  "proxy, empty cache",
		"peer":   "peer (distribution proxy), empty",
	}
)

// cacheEnv is what every cache benchmark shares: the upstream with its blob,
// the proxy's data folder (store, tokens, signing key) and the clients.
type cacheEnv struct {
	tmp     string
	up      *registry.Registry
	counter *upstreamCounter
	blob    v1.Hash
	upAuth  [2]string // the upstream credential
	tokAuth [2]string // the project pull token, for the proxy

	home   string
	store  *secret.Store
	tokens *proxy.TokenStore
	signer *proxy.Signer

	client *http.Client
	bufs   [][]byte // one read buffer per client, allocated up front
	seq    int      // names the per-round folders
}

func newCacheEnv(ctx context.Context) (_ *cacheEnv, err error) {
	e := &cacheEnv{counter: &upstreamCounter{}}
	if e.tmp, err = os.MkdirTemp("", "pullsecret-bench-cache-"); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	const user, pass = "bench", "bench-upstream-pw"
	e.upAuth = [2]string{user, pass}
	// The server's goroutines inherit the label (CPU profiles by side).
	pprof.Do(ctx, pprof.Labels("side", "upstream"), func(ctx context.Context) {
		e.up, err = registry.Start(ctx, registry.WithHTPasswd(map[string]string{user: pass}),
			registry.WithFilesystem(filepath.Join(e.tmp, "upstream")),
			registry.WithHandlerWrapper(e.counter.wrap))
	})
	if err != nil {
		return nil, fmt.Errorf("start the upstream: %w", err)
	}
	if e.blob, err = e.up.SeedBlob(ctx, cacheRepo, cacheBlobSize, registry.RandSeed(4)); err != nil {
		return nil, fmt.Errorf("seed blob: %w", err)
	}

	e.home = filepath.Join(e.tmp, "home")
	if e.store, err = secret.Open(e.home); err != nil {
		return nil, err
	}
	pat, err := secret.ParsePattern(e.up.Host())
	if err != nil {
		return nil, err
	}
	if _, err := e.store.Create(ctx, secret.Secret{Project: "bench", Name: "upstream", Kind: secret.Basic, Registries: []secret.Pattern{pat}},
		secret.Value{Username: user, Password: pass}); err != nil {
		return nil, err
	}
	if e.tokens, err = proxy.NewTokenStore(e.home); err != nil {
		return nil, err
	}
	tok, _, err := e.tokens.Create(ctx, proxy.TokenSpec{Project: "bench", Name: "bench", Scopes: []string{proxy.ScopePull}, TTL: time.Hour})
	if err != nil {
		return nil, err
	}
	e.tokAuth = [2]string{"bench", tok}
	if e.signer, err = proxy.LoadSigner(e.home); err != nil {
		return nil, err
	}
	e.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2 * cacheClients, DisableCompression: true}}
	for range cacheClients {
		e.bufs = append(e.bufs, make([]byte, cacheClientBuf))
	}
	return e, nil
}

func (e *cacheEnv) close() {
	if e.client != nil {
		e.client.CloseIdleConnections()
	}
	if e.up != nil {
		e.up.Close()
	}
	os.RemoveAll(e.tmp)
}

// roundDir is a fresh folder for one proxy or peer.
func (e *cacheEnv) roundDir(kind string) (string, error) {
	e.seq++
	dir := filepath.Join(e.tmp, fmt.Sprintf("%s-%d", kind, e.seq))
	return dir, os.MkdirAll(dir, 0o700)
}

// get fetches url with Basic auth and reads the body with client buffer
// buf, hashing it when verify is set. It returns the size and the time to
// the last byte.
func (e *cacheEnv) get(ctx context.Context, url string, auth [2]string, verify bool, buf int) (n int64, d time.Duration, err error) {
	pprof.Do(ctx, pprof.Labels("side", "client"), func(ctx context.Context) {
		n, d, err = e.doGet(ctx, url, auth, verify, buf)
	})
	return n, d, err
}

func (e *cacheEnv) doGet(ctx context.Context, url string, auth [2]string, verify bool, buf int) (int64, time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, 0, err
	}
	if auth[0] != "" {
		req.SetBasicAuth(auth[0], auth[1])
	}
	start := time.Now()
	resp, err := e.client.Do(req)
	if err != nil {
		return 0, 0, fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return 0, 0, fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(msg)))
	}
	var w io.Writer = io.Discard
	h := sha256.New()
	if verify {
		w = h
	}
	// The wrappers keep io.Copy from using Discard's small-buffer ReadFrom.
	n, err := io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{resp.Body}, e.bufs[buf])
	d := time.Since(start)
	if err != nil {
		return n, d, fmt.Errorf("GET %s: after %d bytes: %w", url, n, err)
	}
	if n != cacheBlobSize {
		return n, d, fmt.Errorf("GET %s: %d bytes, want %d", url, n, cacheBlobSize)
	}
	if verify {
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != e.blob.String() {
			return n, d, fmt.Errorf("GET %s: digest %s, want %s", url, got, e.blob)
		}
	}
	return n, d, nil
}

// warm fills one proxy's cache, waits for the entry to be committed, then
// times the blob through the proxy and directly, interleaved (MiB/s).
func (e *cacheEnv) warm(ctx context.Context, direct string) (map[string]*series, error) {
	p, err := e.startProxy(ctx)
	if err != nil {
		return nil, err
	}
	defer p.close()
	if _, _, err := e.get(ctx, p.blobURL, e.tokAuth, false, 0); err != nil {
		return nil, fmt.Errorf("fill: %w", err)
	}
	if err := p.waitCommitted(ctx); err != nil {
		return nil, err
	}
	// A hit before timing (connection, page cache of the entry). Until the
	// fill has let go of the entry a request may still join it.
	for hits := p.hits(); p.hits() == hits; {
		if _, _, err := e.get(ctx, p.blobURL, e.tokAuth, false, 0); err != nil {
			return nil, err
		}
		if p.hits() == hits {
			time.Sleep(10 * time.Millisecond)
		}
	}
	before, hits := e.counter.blobBytes.Load(), p.hits()
	urls := map[string]string{"direct": direct, "proxy": p.blobURL}
	names := []string{"direct", "proxy"}
	out := map[string]*series{"direct": {}, "proxy": {}}
	for round := range cacheWarmRounds {
		for i := range names {
			n := names[(i+round)%len(names)]
			auth := e.upAuth
			if n == "proxy" {
				auth = e.tokAuth
			}
			cpu0 := cpuTime()
			size, d, err := e.get(ctx, urls[n], auth, false, 0)
			if err != nil {
				return nil, err
			}
			out[n].add(float64(size)/(1<<20)/d.Seconds(), cpuTime()-cpu0)
		}
	}
	// Only the direct GETs may have reached the upstream.
	if got, want := e.counter.blobBytes.Load()-before, int64(cacheWarmRounds)*cacheBlobSize; got != want {
		return nil, fmt.Errorf("the upstream sent %d blob bytes during the warm rounds, want %d (direct only)", got, want)
	}
	if got := p.hits() - hits; got != cacheWarmRounds {
		return nil, fmt.Errorf("the cache counted %d hits in the warm rounds, want %d", got, cacheWarmRounds)
	}
	return out, nil
}

// cold times one client per path, interleaved, each proxy and peer round
// on a fresh, empty cache (seconds to the last byte).
func (e *cacheEnv) cold(ctx context.Context, direct string) (map[string]*series, error) {
	out := map[string]*series{}
	for _, n := range coldNames {
		out[n] = &series{}
	}
	for round := range cacheColdRounds {
		for i := range coldNames {
			n := coldNames[(i+round)%len(coldNames)]
			verify := strings.HasSuffix(n, "-verify")
			var d, cpu time.Duration
			var err error
			switch {
			case strings.HasPrefix(n, "direct"):
				cpu0 := cpuTime()
				_, d, err = e.get(ctx, direct, e.upAuth, verify, 0)
				cpu = cpuTime() - cpu0
			case strings.HasPrefix(n, "proxy"):
				d, cpu, err = e.coldProxy(ctx, verify)
			case n == "peer":
				d, cpu, err = e.coldPeer(ctx)
			case n == "sha256":
				cpu0 := cpuTime()
				d = hashFloor()
				cpu = cpuTime() - cpu0
			}
			if err != nil {
				return nil, fmt.Errorf("%s: %w", n, err)
			}
			out[n].add(d.Seconds(), cpu)
		}
	}
	return out, nil
}

// hashFloor times SHA-256 over cacheBlobSize bytes on one goroutine: a
// fill verifies every byte before it releases the last one, so a cold
// client can never be served faster than this.
func hashFloor() time.Duration {
	buf := make([]byte, 1<<20)
	_, _ = rand.Read(buf)
	h := sha256.New()
	start := time.Now()
	for range cacheBlobSize / len(buf) {
		h.Write(buf)
	}
	h.Sum(nil)
	return time.Since(start)
}

// coldProxy times one GET through a fresh proxy, and the CPU spent until
// its last byte (not the commit's fsync after it).
func (e *cacheEnv) coldProxy(ctx context.Context, verify bool) (time.Duration, time.Duration, error) {
	p, err := e.startProxy(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer p.close()
	before := e.counter.blobBytes.Load()
	cpu0 := cpuTime()
	_, d, err := e.get(ctx, p.blobURL, e.tokAuth, verify, 0)
	cpu := cpuTime() - cpu0
	if err != nil {
		return d, cpu, err
	}
	// Let the commit (fsync, rename) finish before the next round.
	if err := p.waitCommitted(ctx); err != nil {
		return d, cpu, err
	}
	if got := e.counter.blobBytes.Load() - before; got != cacheBlobSize {
		return d, cpu, fmt.Errorf("the upstream sent %d blob bytes, want %d", got, cacheBlobSize)
	}
	return d, cpu, nil
}

// coldPeer times one GET through a fresh peer.
func (e *cacheEnv) coldPeer(ctx context.Context) (time.Duration, time.Duration, error) {
	p, err := e.startPeer(ctx)
	if err != nil {
		return 0, 0, err
	}
	cpu0 := cpuTime()
	_, d, err := e.get(ctx, p.blobURL, [2]string{}, false, 0)
	cpu := cpuTime() - cpu0
	// Close waits for the handler, which commits after the last byte.
	if cerr := p.close(); err == nil && cerr != nil {
		err = cerr
	}
	return d, cpu, err
}

// concResult is one path's figures over the concurrent rounds: wall time
// (s), upstream blob bytes (in blob sizes), heap and RSS growth (MiB).
type concResult struct {
	wall, upstream, heap, rss []float64
}

// concurrent runs cacheClients clients at once on one cold blob: directly,
// through a fresh proxy, through a fresh peer; rotating who goes first.
func (e *cacheEnv) concurrent(ctx context.Context, direct string) (map[string]*concResult, error) {
	out := map[string]*concResult{}
	for _, n := range concNames {
		out[n] = &concResult{}
	}
	for round := range cacheConcRounds {
		for i := range concNames {
			n := concNames[(i+round)%len(concNames)]
			url, auth, closeFn := direct, e.upAuth, func() error { return nil }
			switch n {
			case "proxy":
				p, err := e.startProxy(ctx)
				if err != nil {
					return nil, err
				}
				url, auth = p.blobURL, e.tokAuth
				closeFn = func() error {
					err := p.waitCommitted(ctx)
					p.close()
					return err
				}
			case "peer":
				p, err := e.startPeer(ctx)
				if err != nil {
					return nil, err
				}
				url, auth, closeFn = p.blobURL, [2]string{}, p.close
			}
			before := e.counter.blobBytes.Load()
			heap0, rss0 := memBaseline()
			s := startMemSampler(5 * time.Millisecond)
			wall, err := e.clients(ctx, url, auth)
			heap1, rss1 := s.stop()
			if cerr := closeFn(); err == nil && cerr != nil {
				err = cerr
			}
			if err != nil {
				return nil, fmt.Errorf("%s: %w", n, err)
			}
			r := out[n]
			r.wall = append(r.wall, wall.Seconds())
			r.upstream = append(r.upstream, float64(e.counter.blobBytes.Load()-before)/cacheBlobSize)
			r.heap = append(r.heap, mib(heap1-min(heap0, heap1)))
			r.rss = append(r.rss, mib(rss1-min(rss0, rss1)))
		}
	}
	return out, nil
}

// clients runs cacheClients GETs of url released at once, and returns the
// wall time until the last one has its last byte.
func (e *cacheEnv) clients(ctx context.Context, url string, auth [2]string) (time.Duration, error) {
	start := make(chan struct{})
	errs := make([]error, cacheClients)
	var wg sync.WaitGroup
	for i := range cacheClients {
		wg.Go(func() {
			<-start
			_, _, errs[i] = e.get(ctx, url, auth, false, i)
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	return time.Since(t0), errors.Join(errs...)
}

// cachedProxy is one in-process proxy with its own cache.
type cachedProxy struct {
	blobURL string
	digest  digest.Digest
	cache   *cache.Cache
	records *cache.MemoryAccessRecords
	srv     *proxy.Server
	reg     *prometheus.Registry
	cancel  context.CancelFunc
	served  chan error
	dir     string
}

// startProxy builds a proxy as `pullsecret serve` does with the cache on:
// the content cache on the filesystem driver (openContentCache), the access
// records file (openProxyCache) and the caching fetcher in front of the
// direct one (withCachedFetcher), all in a fresh folder. Request logs go
// nowhere at the default level.
func (e *cacheEnv) startProxy(ctx context.Context) (_ *cachedProxy, err error) {
	dir, err := e.roundDir("proxy")
	if err != nil {
		return nil, err
	}
	p := &cachedProxy{dir: dir, digest: digest.Digest(e.blob.String())}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	cfg := proxy.DefaultConfig()
	cfg.Home = e.home
	cfg.Listen = "127.0.0.1:0"
	cfg.Aliases = map[string]string{"up": e.up.Host()}
	cfg.Cache.Enabled = true
	cfg.Cache.Root = filepath.Join(dir, "cache")
	if err := cfg.AllowPrivateUpstreams.Set([]string{"127.0.0.1/32"}); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := proxy.NewLogger(io.Discard, cfg.Log)

	p.reg = prometheus.NewRegistry()
	m, err := cache.NewPrometheus(p.reg)
	if err != nil {
		return nil, err
	}
	p.cache, err = cache.OpenFilesystem(ctx, cfg.Cache.Root, cache.WithTagTTL(cfg.Cache.TagTTL),
		cache.WithMaxManifestSize(int64(cfg.MaxManifestSize)), cache.WithMetrics(m), cache.WithLogger(log))
	if err != nil {
		return nil, fmt.Errorf("cache %s: %w", cfg.Cache.Root, err)
	}
	if err := os.Chmod(cfg.Cache.Root, 0o700); err != nil {
		return nil, err
	}
	if p.records, err = cache.OpenAccessRecords(filepath.Join(dir, "access.json")); err != nil {
		return nil, fmt.Errorf("access records: %w", err)
	}
	auth := proxy.NewAuth(e.tokens, e.signer,
		proxy.WithTokenTTL(cfg.TokenTTL),
		proxy.WithRepositoryFilter(proxy.AllowlistFilter(cfg, e.store)),
		proxy.WithAuthLogger(log))
	cachedFetcher := proxy.WithFetcher(func(next proxy.Fetcher) proxy.Fetcher {
		return proxy.NewCachedFetcher(next, p.cache, p.records, proxy.CachedOptions{
			TagTTL: cfg.Cache.TagTTL, AccessTTL: cfg.Cache.AccessTTL, Logger: log, Registerer: p.reg,
			MaxManifestSize: int64(cfg.MaxManifestSize),
		})
	})
	p.srv, err = proxy.New(cfg, e.store, auth, proxy.WithLogger(log), proxy.WithHandler("/token", auth.TokenHandler()),
		proxy.WithMetricsRegistry(p.reg), cachedFetcher)
	if err != nil {
		return nil, err
	}
	ln, err := p.srv.Listen()
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	p.cancel = cancel
	p.served = make(chan error, 1)
	go pprof.Do(sctx, pprof.Labels("side", "proxy"), func(ctx context.Context) { p.served <- p.srv.Serve(ctx, ln) })
	p.blobURL = "http://" + ln.Addr().String() + "/v2/up/" + cacheRepo + "/blobs/" + e.blob.String()
	return p, nil
}

// waitCommitted waits until the blob is a committed cache entry (the fill
// goroutine syncs and renames it after the last byte went out).
func (p *cachedProxy) waitCommitted(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		if _, err := p.cache.Stat(ctx, cache.KindBlob, p.digest); err == nil {
			return nil
		} else if !errors.Is(err, cache.ErrNotFound) {
			return fmt.Errorf("cache stat: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the blob was never committed to the cache: %w", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// hits is the cache's hit counter for blobs.
func (p *cachedProxy) hits() int {
	mfs, err := p.reg.Gather()
	if err != nil {
		return 0
	}
	n := 0.0
	for _, mf := range mfs {
		if mf.GetName() != "pullsecret_cache_hits_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "kind" && l.GetValue() == string(cache.KindBlob) {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return int(n)
}

func (p *cachedProxy) close() {
	if p.cancel != nil {
		p.cancel()
		<-p.served
	}
	if p.srv != nil {
		p.srv.Close()
	}
	if p.cache != nil {
		p.cache.Close()
	}
	if p.records != nil {
		p.records.Close()
	}
	os.RemoveAll(p.dir)
}

// peer is distribution v3 in proxy mode (its pull-through cache) in front
// of the upstream, with the upstream's username and password, on the
// filesystem driver in a fresh folder: the reference the cache is compared
// with.
type peer struct {
	blobURL string
	app     *handlers.App
	srv     *httptest.Server
	dir     string
}

func (e *cacheEnv) startPeer(ctx context.Context) (_ *peer, err error) {
	dir, err := e.roundDir("peer")
	if err != nil {
		return nil, err
	}
	p := &peer{dir: dir}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	noTTL := time.Duration(0) // no expiry scheduler: nothing expires during a run
	cfg := &configuration.Configuration{}
	cfg.Storage = configuration.Storage{
		"filesystem":  configuration.Parameters{"rootdirectory": dir},
		"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
		"cache":       configuration.Parameters{"blobdescriptor": "inmemory"},
	}
	cfg.HTTP.Secret = rand.Text()
	cfg.Proxy = configuration.Proxy{RemoteURL: e.up.URL(), Username: e.upAuth[0], Password: e.upAuth[1], TTL: &noTTL}
	if p.app, err = newPeerApp(ctx, cfg); err != nil {
		return nil, err
	}
	pprof.Do(ctx, pprof.Labels("side", "peer"), func(context.Context) { p.srv = httptest.NewServer(p.app) })
	p.blobURL = p.srv.URL + "/v2/" + cacheRepo + "/blobs/" + e.blob.String()
	return p, nil
}

// newPeerApp turns distribution's configuration panics into errors.
func newPeerApp(ctx context.Context, cfg *configuration.Configuration) (app *handlers.App, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("distribution rejected the proxy configuration: %v", r)
		}
	}()
	return handlers.NewApp(ctx, cfg), nil
}

func (p *peer) close() error {
	if p.srv != nil {
		p.srv.Close() // waits for handlers in flight
	}
	var err error
	if p.app != nil {
		if serr := p.app.Shutdown(); serr != nil {
			err = fmt.Errorf("peer shutdown: %w", serr)
		}
	}
	os.RemoveAll(p.dir)
	return err
}

// upstreamCounter counts the body bytes of the upstream's blob GET
// responses: what the upstream sent, whoever asked.
type upstreamCounter struct {
	blobBytes atomic.Int64
}

func (c *upstreamCounter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") {
			next.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(&countingWriter{ResponseWriter: w, n: &c.blobBytes}, r)
	})
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n.Add(int64(n))
	return n, err
}

func (w *countingWriter) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

func (w *countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Memory. The heap in use is HeapInuse of runtime.MemStats, read through
// runtime/metrics (no stop-the-world): objects plus the unused part of
// their spans. The process holds the client and the upstream too, so the
// growth measured is an upper bound of the proxy's.
var heapInuseSamples = []string{"/memory/classes/heap/objects:bytes", "/memory/classes/heap/unused:bytes"}

func heapInuse(s []metrics.Sample) uint64 {
	metrics.Read(s)
	var n uint64
	for _, x := range s {
		if x.Value.Kind() == metrics.KindUint64 {
			n += x.Value.Uint64()
		}
	}
	return n
}

func newHeapSamples() []metrics.Sample {
	s := make([]metrics.Sample, len(heapInuseSamples))
	for i, name := range heapInuseSamples {
		s[i].Name = name
	}
	return s
}

// rss is the resident set size from /proc/self/statm (0 elsewhere).
func rss() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0
	}
	return pages * uint64(os.Getpagesize())
}

// memBaseline collects garbage and returns the heap in use and the RSS.
func memBaseline() (heap, res uint64) {
	runtime.GC()
	return heapInuse(newHeapSamples()), rss()
}

type memSampler struct {
	done              chan struct{}
	finished          chan struct{}
	peakHeap, peakRSS uint64
}

// startMemSampler records the peak heap in use and RSS every interval.
func startMemSampler(every time.Duration) *memSampler {
	s := &memSampler{done: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		defer close(s.finished)
		samples := newHeapSamples()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			s.peakHeap = max(s.peakHeap, heapInuse(samples))
			s.peakRSS = max(s.peakRSS, rss())
			select {
			case <-s.done:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// stop ends sampling and returns the peaks.
func (s *memSampler) stop() (heap, res uint64) {
	close(s.done)
	<-s.finished
	return s.peakHeap, s.peakRSS
}

func mib(n uint64) float64 { return float64(n) / (1 << 20) }

// startCPUProfile writes a CPU profile to path until the returned stop is
// called (nothing when path is empty).
func startCPUProfile(path string) (stop func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "cpu profile: %v\n", err)
		}
	}, nil
}
