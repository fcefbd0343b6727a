// Package gatewayerrors answers the errors Traefik makes itself in the services' JSON shape.
//
// Traefik's rateLimit (429) and buffering (413) middlewares answer in plain text, and set no
// Content-Type (Go's server guesses one from the body later). Traefik's own errors middleware
// cannot tell those from a service's 413 or 429: it looks at the status alone, and replaces the
// body and headers of every answer it catches (a service's quota message and its Retry-After
// would be lost). This middleware, outermost on each router, rewrites an answer only if its status
// is one it has a message for AND it carries no Content-Type: every service names one (JSON from
// the APIs, HTML from the console's pages), so theirs pass untouched, and Traefik's keep every
// header it set (Retry-After, X-Retry-In) with a body {"message": ..., "errors": {}}.
package gatewayerrors

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
)

// Config maps a status ("413") to the message its JSON body carries.
type Config struct {
	Messages map[string]string `json:"messages,omitempty"`
}

// CreateConfig returns an empty configuration: nothing is rewritten.
func CreateConfig() *Config {
	return &Config{Messages: map[string]string{}}
}

type gatewayErrors struct {
	next   http.Handler
	bodies map[int][]byte
}

// New builds the middleware; a status that is not a 4xx or 5xx is a configuration error.
func New(_ context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	bodies := make(map[int][]byte, len(config.Messages))
	for status, message := range config.Messages {
		code, err := strconv.Atoi(status)
		if err != nil || code < 400 || code > 599 {
			return nil, fmt.Errorf("%s: %q is not an error status", name, status)
		}
		body, err := json.Marshal(map[string]interface{}{
			"message": message,
			"errors":  map[string][]string{},
		})
		if err != nil {
			return nil, err
		}
		bodies[code] = append(body, '\n')
	}
	return &gatewayErrors{next: next, bodies: bodies}, nil
}

func (g *gatewayErrors) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	g.next.ServeHTTP(&writer{rw: rw, bodies: g.bodies}, req)
}

// writer passes everything through, except an answer it rewrites: it sends the JSON body in
// place of the plain text and drops what the inner handler writes after.
type writer struct {
	rw       http.ResponseWriter
	bodies   map[int][]byte
	sent     bool
	replaced bool
}

func (w *writer) Header() http.Header {
	return w.rw.Header()
}

func (w *writer) WriteHeader(code int) {
	if w.sent {
		return
	}
	if code < 200 { // informational: the final status comes later
		w.rw.WriteHeader(code)
		return
	}
	w.sent = true
	header := w.rw.Header()
	body, ours := w.bodies[code]
	if ours && header.Get("Content-Type") == "" {
		w.replaced = true
		header.Set("Content-Type", "application/json")
		header.Set("Content-Length", strconv.Itoa(len(body)))
		w.rw.WriteHeader(code)
		_, _ = w.rw.Write(body) // a HEAD request's body is dropped by the server
		return
	}
	w.rw.WriteHeader(code)
}

func (w *writer) Write(data []byte) (int, error) {
	if !w.sent {
		w.WriteHeader(http.StatusOK)
	}
	if w.replaced {
		return len(data), nil
	}
	return w.rw.Write(data)
}

// Flush and Hijack reach the connection as if this writer were not there.
func (w *writer) Flush() {
	if flusher, ok := w.rw.(http.Flusher); ok {
		flusher.Flush()
	}
}

func (w *writer) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hijacker, ok := w.rw.(http.Hijacker)
	if !ok {
		return nil, nil, fmt.Errorf("%T cannot be hijacked", w.rw)
	}
	return hijacker.Hijack()
}
