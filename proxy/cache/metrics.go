package cache

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Labels say whom a request served: the project (Project option) and the
// upstream (In option, or the tag key). Either may be empty.
type Labels struct {
	Project  string
	Upstream string
}

// Metrics receives the cache's events. Implementations must be safe for
// concurrent use and fast (they are called on the data path).
type Metrics interface {
	// Hit: served from a committed entry.
	Hit(kind Kind, l Labels)
	// Miss: this request started an upstream fetch.
	Miss(kind Kind, l Labels)
	// Coalesced: this request joined a fetch already in flight instead of
	// fetching again.
	Coalesced(kind Kind, l Labels)
	// UpstreamBytes: n more bytes received from the upstream by a fill
	// (labels of the request that started it).
	UpstreamBytes(kind Kind, l Labels, n int64)
	// StaleServe: a tag was served stale because the upstream was down.
	StaleServe(l Labels)
	// FillFailure: a fill failed. reason is one of digest, size,
	// too_large, timeout, canceled, fetch, transfer, spool, commit.
	FillFailure(kind Kind, l Labels, reason string)
}

type nopMetrics struct{}

func (nopMetrics) Hit(Kind, Labels)                  {}
func (nopMetrics) Miss(Kind, Labels)                 {}
func (nopMetrics) Coalesced(Kind, Labels)            {}
func (nopMetrics) UpstreamBytes(Kind, Labels, int64) {}
func (nopMetrics) StaleServe(Labels)                 {}
func (nopMetrics) FillFailure(Kind, Labels, string)  {}

// Prometheus implements Metrics with Prometheus counters:
//
//	pullsecret_cache_hits_total{kind,project,upstream}
//	pullsecret_cache_misses_total{kind,project,upstream}
//	pullsecret_cache_coalesced_total{kind,project,upstream}
//	pullsecret_cache_upstream_bytes_total{kind,project,upstream}
//	pullsecret_cache_stale_serves_total{project,upstream}
//	pullsecret_cache_fill_failures_total{kind,reason}
type Prometheus struct {
	hits, misses, coalesced, upstreamBytes *prometheus.CounterVec
	stale, failures                        *prometheus.CounterVec
}

// NewPrometheus creates the cache's collectors and registers them on reg
// (never on the global registerer).
func NewPrometheus(reg prometheus.Registerer) (*Prometheus, error) {
	kpu := []string{"kind", "project", "upstream"}
	p := &Prometheus{
		hits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_cache_hits_total", Help: "Requests served from a committed cache entry.",
		}, kpu),
		misses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_cache_misses_total", Help: "Requests that started an upstream fetch.",
		}, kpu),
		coalesced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_cache_coalesced_total", Help: "Requests that joined an upstream fetch already in flight.",
		}, kpu),
		upstreamBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_cache_upstream_bytes_total", Help: "Bytes received from upstreams by cache fills.",
		}, kpu),
		stale: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_cache_stale_serves_total", Help: "Tags served stale because the upstream was unavailable.",
		}, []string{"project", "upstream"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_cache_fill_failures_total", Help: "Cache fills that failed, by reason.",
		}, []string{"kind", "reason"}),
	}
	for _, c := range []prometheus.Collector{p.hits, p.misses, p.coalesced, p.upstreamBytes, p.stale, p.failures} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func (p *Prometheus) Hit(k Kind, l Labels) {
	p.hits.WithLabelValues(string(k), l.Project, l.Upstream).Inc()
}

func (p *Prometheus) Miss(k Kind, l Labels) {
	p.misses.WithLabelValues(string(k), l.Project, l.Upstream).Inc()
}

func (p *Prometheus) Coalesced(k Kind, l Labels) {
	p.coalesced.WithLabelValues(string(k), l.Project, l.Upstream).Inc()
}

func (p *Prometheus) UpstreamBytes(k Kind, l Labels, n int64) {
	p.upstreamBytes.WithLabelValues(string(k), l.Project, l.Upstream).Add(float64(n))
}

func (p *Prometheus) StaleServe(l Labels) {
	p.stale.WithLabelValues(l.Project, l.Upstream).Inc()
}

func (p *Prometheus) FillFailure(k Kind, _ Labels, reason string) {
	p.failures.WithLabelValues(string(k), reason).Inc()
}

// Counters is an in-memory Metrics that totals events by kind (labels
// ignored), for tests and the CLI.
type Counters struct {
	mu sync.Mutex
	s  CountersSnapshot
}

// CountersSnapshot is a copy of Counters' totals.
type CountersSnapshot struct {
	Hits, Misses, Coalesced map[Kind]int64
	UpstreamBytes           map[Kind]int64
	StaleServes             int64
	FillFailures            map[string]int64
}

func (c *Counters) add(m *map[Kind]int64, k Kind, n int64) {
	c.mu.Lock()
	if *m == nil {
		*m = map[Kind]int64{}
	}
	(*m)[k] += n
	c.mu.Unlock()
}

func (c *Counters) Hit(k Kind, _ Labels)                    { c.add(&c.s.Hits, k, 1) }
func (c *Counters) Miss(k Kind, _ Labels)                   { c.add(&c.s.Misses, k, 1) }
func (c *Counters) Coalesced(k Kind, _ Labels)              { c.add(&c.s.Coalesced, k, 1) }
func (c *Counters) UpstreamBytes(k Kind, _ Labels, n int64) { c.add(&c.s.UpstreamBytes, k, n) }

func (c *Counters) StaleServe(Labels) {
	c.mu.Lock()
	c.s.StaleServes++
	c.mu.Unlock()
}

func (c *Counters) FillFailure(_ Kind, _ Labels, reason string) {
	c.mu.Lock()
	if c.s.FillFailures == nil {
		c.s.FillFailures = map[string]int64{}
	}
	c.s.FillFailures[reason]++
	c.mu.Unlock()
}

// Snapshot returns a copy of the totals (maps never nil).
func (c *Counters) Snapshot() CountersSnapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	return CountersSnapshot{
		Hits:          cloneMap(c.s.Hits),
		Misses:        cloneMap(c.s.Misses),
		Coalesced:     cloneMap(c.s.Coalesced),
		UpstreamBytes: cloneMap(c.s.UpstreamBytes),
		StaleServes:   c.s.StaleServes,
		FillFailures:  cloneMap(c.s.FillFailures),
	}
}

func cloneMap[K comparable](m map[K]int64) map[K]int64 {
	out := make(map[K]int64, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
