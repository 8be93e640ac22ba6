package proxy

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the server's Prometheus metrics, in a registry of their own
// (never the global default one). Labels hold route names, status codes,
// project names and upstream hosts from the allowlist: never a credential,
// never a client-chosen string.
type metrics struct {
	reg        *prometheus.Registry
	requests   *prometheus.CounterVec
	bytes      *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	upstream   *prometheus.HistogramVec
	upBytes    *prometheus.CounterVec
	authFails  *prometheus.CounterVec
	logins     *prometheus.CounterVec
	inflight   prometheus.Gauge
	verifyFail *prometheus.CounterVec
	h          http.Handler
}

func newMetrics(reg *prometheus.Registry) *metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		reg: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_http_requests_total",
			Help: "HTTP requests served, by route, method, status code and project.",
		}, []string{"route", "method", "code", "project"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_http_response_bytes_total",
			Help: "Response body bytes sent to clients, by route and project.",
		}, []string{"route", "project"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "pullsecret_http_request_duration_seconds",
			Help:    "Time to serve a request, by route.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
		}, []string{"route"}),
		upstream: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "pullsecret_upstream_request_duration_seconds",
			Help:    "Latency of upstream requests until response headers (auth: ping and token exchange), by upstream and operation.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"upstream", "op"}),
		upBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_upstream_bytes_total",
			Help: "Blob bytes received from upstreams and passed to clients, by upstream.",
		}, []string{"upstream"}),
		authFails: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_auth_failures_total",
			Help: "Requests refused for authentication or authorization, by reason (missing, invalid, forbidden).",
		}, []string{"reason"}),
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_login_failures_total",
			Help: "Failed project-token logins (token server, /v2/, credential API), by reason (invalid, expired, revoked, rate-limited, bad-request).",
		}, []string{"reason"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pullsecret_http_requests_in_flight",
			Help: "Requests being served.",
		}),
		verifyFail: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_upstream_digest_mismatches_total",
			Help: "Upstream content refused because it did not match its digest, by upstream.",
		}, []string{"upstream"}),
	}
	reg.MustRegister(m.requests, m.bytes, m.duration, m.upstream, m.upBytes, m.authFails, m.logins, m.inflight, m.verifyFail)
	// Ignore "already registered": the caller may share a registry that
	// has them.
	_ = reg.Register(collectors.NewGoCollector())
	_ = reg.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.h = promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
	return m
}

func (m *metrics) handler() http.Handler { return m.h }

func (m *metrics) upstreamLatency(upstream, op string, d time.Duration) {
	if m == nil {
		return
	}
	m.upstream.WithLabelValues(upstream, op).Observe(d.Seconds())
}

func (m *metrics) request(route, method string, code int, project string, bytes int64, d time.Duration) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(route, method, strconv.Itoa(code), project).Inc()
	if bytes > 0 {
		m.bytes.WithLabelValues(route, project).Add(float64(bytes))
	}
	m.duration.WithLabelValues(route).Observe(d.Seconds())
}

func (m *metrics) authFailure(reason string) {
	if m == nil {
		return
	}
	m.authFails.WithLabelValues(reason).Inc()
}

// LoginFailure counts a failed project-token login; give it to
// WithAuthFailureHook. Unknown reasons count as "other".
func (s *Server) LoginFailure(reason string) {
	switch reason {
	case "invalid", "expired", "revoked", "rate-limited", "bad-request":
	default:
		reason = "other"
	}
	s.metrics.logins.WithLabelValues(reason).Inc()
}
