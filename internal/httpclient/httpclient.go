// Package httpclient builds the HTTP client that pullsecret's own clients
// (the helpers' remote mode, the kubelet plugin) use to reach the server.
package httpclient

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

// ToServer returns a client for calls that carry a project or
// service-account token to the configured server: every call is bounded
// (callers such as Docker and kubelet set no timeout of their own), the
// token never follows a redirect, and caFile, if set, adds a CA to the
// system roots.
func ToServer(dialTimeout, timeout time.Duration, caFile string) (*http.Client, error) {
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: dialTimeout}).DialContext,
		TLSHandshakeTimeout:   dialTimeout,
		ResponseHeaderTimeout: timeout,
		ForceAttemptHTTP2:     true,
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no PEM certificate in %s", caFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{Transport: tr, Timeout: timeout, CheckRedirect: func(*http.Request, []*http.Request) error {
		// The token goes to the configured server only.
		return http.ErrUseLastResponse
	}}, nil
}
