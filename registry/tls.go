package registry

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// tlsMaterial is a CA generated for one registry and the leaf it signed.
type tlsMaterial struct {
	caPEM  []byte
	caFile string
	pool   *x509.CertPool
	leaf   tls.Certificate
}

// newTLSMaterial makes a CA and a leaf for 127.0.0.1, ::1 and localhost, and
// writes the CA to dir/certs/ca.crt. A separate CA (rather than a self-signed leaf)
// is what clients' trust settings expect: SSL_CERT_FILE for crane, a
// --cert-dir holding *.crt for skopeo, hosts.toml ca= for containerd.
func newTLSMaterial(dir string) (*tlsMaterial, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("registry: CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "pullsecret test registry CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("registry: CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, fmt.Errorf("registry: CA certificate: %w", err)
	}

	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("registry: leaf key: %w", err)
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:     []string{"localhost"},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("registry: leaf certificate: %w", err)
	}

	m := &tlsMaterial{
		caPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		caFile: filepath.Join(dir, "certs", "ca.crt"),
		pool:   x509.NewCertPool(),
		leaf:   tls.Certificate{Certificate: [][]byte{leafDER, caDER}, PrivateKey: leafKey},
	}
	m.pool.AddCert(ca)
	if err := os.MkdirAll(filepath.Dir(m.caFile), 0o755); err != nil {
		return nil, fmt.Errorf("registry: CA dir: %w", err)
	}
	if err := os.WriteFile(m.caFile, m.caPEM, 0o644); err != nil {
		return nil, fmt.Errorf("registry: write CA file: %w", err)
	}
	return m, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func (m *tlsMaterial) serverConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{m.leaf}, MinVersion: tls.VersionTLS12}
}

func (m *tlsMaterial) clientConfig() *tls.Config {
	return &tls.Config{RootCAs: m.pool, MinVersion: tls.VersionTLS12}
}

// CACertPEM returns the PEM of the CA that signed the registry's certificate,
// or nil without WithTLS.
func (r *Registry) CACertPEM() []byte {
	if r.tls == nil {
		return nil
	}
	return append([]byte(nil), r.tls.caPEM...)
}

// CAFile returns the path of a file holding CACertPEM, named ca.crt in a
// directory of its own (so filepath.Dir(CAFile()) works as skopeo's
// --cert-dir), or "" without WithTLS. Close removes it.
func (r *Registry) CAFile() string {
	if r.tls == nil {
		return ""
	}
	return r.tls.caFile
}

// CertPool returns a pool holding only the registry's CA, or nil without
// WithTLS.
func (r *Registry) CertPool() *x509.CertPool {
	if r.tls == nil {
		return nil
	}
	return r.tls.pool.Clone()
}
